"""End to end: the pack in a real ComfyUI server on the CPU, driven through its HTTP API.

    .venv/bin/python tests/comfy_e2e.py --comfyui /path/to/ComfyUI --python /path/to/comfy-venv/bin/python

It makes a throw-away ComfyUI base directory (``--base-directory``) with the pack linked into
custom_nodes/ and random-weight models under the names the example workflows use, in the real
layouts core's loaders read (made once in --cache, about 5 GB, in about a minute): an SD 1.5
checkpoint, a depth ControlNet, the five adapters in DMP's release layout, an SD 2-shaped UNet
(a base DMP must refuse), an SDXL LoRA, and broken adapter files.

Each example workflow is converted from the UI format to the API format with the server's own
/object_info (and, where Chromium is installed, the result must equal what ComfyUI's own
frontend makes of the workflow, ``app.graphToPrompt()``), submitted to /prompt and awaited in
/history; every preview must come back through /view and every saved file must exist.
The frontend check runs twice: with the server's own node schemas, and with the newest core's
(tests/support/comfy_stubs/core_nodes/newest.json, swapped into the page's /object_info), and each time our
converter must also read the frontend's own re-save of the workflow. ``--front-end-root`` serves
another frontend (e.g. the newest comfyui-frontend-package); ``--only-frontend`` stops after that
check. Resolutions and sampler steps are lowered for the CPU (--as-shipped keeps them). Then:

- the raw depth workflow 1 saves as .npy must equal ``DMPModel.predict`` (the library path, run
  here) on the same checkpoint, adapter, image and settings, to 1e-4 of the depth range;
- workflow 2 loads the base once (one "model_type" load in the server log for the whole graph);
- prompts, CLIP Text Encode's conditioning, core's UNet loader with fp8 weights, tiles and a flip
  ensemble with its uncertainty output, an adapter found
  through extra_model_paths.yaml;
- bad input (a non-SD 1.x model, an SDXL LoRA, corrupt, truncated and pickled adapter files, a
  prediction given to another task's node, an unknown class name, a missing file) must come back
  as ComfyUI execution errors with the expected messages, and the server must go on working;
- Cancel during sampling stops within one step; 20 repeated runs keep the server's memory flat;
- workflow 6's .glb, re-read with an independent glTF reader (tests/support/asset_readers.py), holds a mesh
  with unit normals and a texture of the image's size; with Chromium, the frontend's Preview 3D
  widget is handed that run's output (as on an "executed" message), must fetch the file, and is
  photographed to preview3d.png in the base directory (kept with --keep) for a person to look at.

The run prints a summary and exits non-zero on any failure.

Not part of the default test run (the file name does not start with test_); as a pytest test:

    COMFYUI_E2E_PATH=/path/to/ComfyUI COMFYUI_E2E_PYTHON=/path/to/python pytest tests/comfy_e2e.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests", ROOT / "tests" / "support"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from comfy_stubs.model_files import ADAPTERS, adapter_choice, write_official_adapter, write_sdxl_lora  # noqa: E402
from comfy_stubs.workflow_api import to_api  # noqa: E402

WORKFLOWS = ROOT / "example_workflows"
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
CONTROLNET = "control_v11f1p_sd15_depth_fp16.safetensors"
SD2_UNET = "sd21-unet-fp16.safetensors"
SDXL_LORA = "sdxl_detail_lora.safetensors"
BROKEN = {"corrupt": "broken/corrupt.safetensors", "truncated": "broken/truncated.safetensors",
          "pickled": "broken/depth-pickled/pytorch_lora_weights.bin"}
EXTRA_ADAPTER = "normal-extra-notext/pytorch_lora_weights.safetensors"
SD1_CONFIG = ROOT / "dmp_model" / "sd" / "configs" / "sd1"
# The largest difference allowed between the node path and the library, relative to the depth range.
PARITY_TOLERANCE = 1e-4
# Core node schemas of newer cores (tests/support/comfy_stubs/core_nodes) the frontend check also shows the page.
NEWER_SNAPSHOTS = ("newest",)


# Models ------------------------------------------------------------------------------------------

def make_full_size_models(cache: Path) -> Path:
    """Random-weight models in the real layouts (made once): checkpoints/, controlnet/, dmp/, unet/, loras/."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_layout import write_single_file

    done = cache / "complete-v2"
    if done.is_file():
        return cache
    print(f"making full-size random models in {cache} (once)", flush=True)
    unet = _sd1_unet()
    if not (cache / "checkpoints" / CHECKPOINT).is_file():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD1_CONFIG, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(SD1_CONFIG, subfolder="text_encoder"))
        write_single_file(cache / "checkpoints" / CHECKPOINT, unet, vae, text, dtype=torch.float16)
        controlnet = ControlNetModel.from_unet(unet).to(torch.float16)
        controlnet.save_pretrained(cache / "controlnet_diffusers")
        (cache / "controlnet").mkdir(exist_ok=True)
        shutil.move(cache / "controlnet_diffusers" / "diffusion_pytorch_model.safetensors",
                    cache / "controlnet" / CONTROLNET)
        for seed, name in enumerate(ADAPTERS.values(), start=1):
            write_official_adapter(unet, cache / "dmp" / name, seed, scale=0.02)
    # A base DMP must refuse: an SD 2.x UNet (diffusers layout, which core's UNet loader reads).
    sd2 = UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                               use_linear_projection=True).to(torch.float16)
    (cache / "unet").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd2.state_dict().items()}, str(cache / "unet" / SD2_UNET))
    done.touch()
    return cache


VIDEO_FRAMES = 8


def write_example_video(path: Path, image) -> None:
    """A short clip of `image` panning a pixel per frame, for workflow 5's Load Video."""
    import numpy as np

    from dmp_model.io.video import write_video

    array = np.asarray(image, dtype=np.float32) / 255
    frames = np.stack([np.roll(array, i, axis=1) for i in range(VIDEO_FRAMES)])
    with write_video(path, fps=8) as write:
        write(frames)


def _sd1_unet():
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD1_CONFIG, subfolder="unet"))


def write_bad_adapters(models: Path) -> None:
    """Files a user may have that must be refused: an SDXL LoRA, a corrupt, a truncated and a pickled adapter."""
    write_sdxl_lora(models / "loras" / SDXL_LORA)
    broken = models / "dmp" / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "corrupt.safetensors").write_bytes(b"\x00\x01 not a safetensors file" * 40)
    whole = (models / "dmp" / adapter_choice("depth")).read_bytes()
    (broken / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])
    (broken / "depth-pickled").mkdir(exist_ok=True)
    (broken / "depth-pickled" / "pytorch_lora_weights.bin").write_bytes(_pickle_with_code())


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo the e2e pickle ran code > /dev/null",))


def _pickle_with_code() -> bytes:
    import pickle

    return pickle.dumps({"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
                         _Payload()})


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def prepare_base(base: Path, cache: Path) -> Path:
    """A ComfyUI base directory: the pack in custom_nodes, the models, an input image, and an
    extra_model_paths.yaml naming one more adapter folder (returns the yaml)."""
    from PIL import Image

    models = base / "models"
    full = make_full_size_models(cache)
    for folder in ("checkpoints", "controlnet", "dmp"):
        shutil.copytree(full / folder, models / folder, dirs_exist_ok=True, copy_function=_link_or_copy)
    unets = models / "unet"
    unets.mkdir(parents=True, exist_ok=True)
    _link_or_copy(str(full / "unet" / SD2_UNET), str(unets / SD2_UNET))
    _link_or_copy(str(full / "checkpoints" / CHECKPOINT), str(unets / CHECKPOINT))  # core's UNet loader reads it
    write_bad_adapters(models)
    extra = base / "extra"
    write_official_adapter(_sd1_unet(), extra / EXTRA_ADAPTER.split("/")[0], 11, scale=0.02)
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "ComfyUI-DMP").symlink_to(ROOT, target_is_directory=True)
    (base / "input").mkdir(exist_ok=True)
    gradient = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
    gradient.save(base / "input" / "example.png")
    write_example_video(base / "input" / "example.mp4", gradient)
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(f"dmp_e2e:\n    base_path: {extra}\n    dmp: .\n", encoding="utf-8")
    return yaml


# Server ------------------------------------------------------------------------------------------

class Server:
    """A ComfyUI server process on 127.0.0.1 and the few API calls the checks need."""

    def __init__(self, comfyui: Path, python: str, base: Path, extra_paths: Path, port: int,
                 front_end_root: Path | None = None):
        self.url, self.port = f"http://127.0.0.1:{port}", port
        self.log = open(base / "server.log", "w", encoding="utf-8")
        command = [python, str(comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                   "--base-directory", str(base), "--extra-model-paths-config", str(extra_paths),
                   "--disable-auto-launch"]
        if front_end_root is not None:  # another frontend than the one the core's requirements pin
            command += ["--front-end-root", str(front_end_root)]
        self.process = subprocess.Popen(command, cwd=comfyui, stdout=self.log, stderr=subprocess.STDOUT)
        self.client_id = uuid.uuid4().hex
        self.socket = None

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}; see {self.log.name}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s")

    def listen(self) -> None:
        """Open the WebSocket the UI uses; progress and executed messages are read after each run."""
        from comfy_stubs.frontend import WebSocket

        self.socket = WebSocket(f"{self.url.replace('http', 'ws')}/ws?clientId={self.client_id}")

    def messages(self, prompt_id: str) -> list[dict]:
        """This prompt's WebSocket messages, up to the one saying the queue went idle after it."""
        found = []
        while True:
            message = json.loads(self.socket.receive())
            data = message.get("data", {})
            if data.get("prompt_id") == prompt_id:
                found.append(message)
                if message["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    return found

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def submit(self, prompt: dict) -> tuple[int, dict]:
        data = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        request = urllib.request.Request(self.url + "/prompt", data=data,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def result(self, prompt_id: str, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died; see {self.log.name}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def rss_mb(self) -> float:
        """The server process's resident memory in MB (Linux)."""
        with open(f"/proc/{self.process.pid}/status", encoding="ascii") as status:
            line = next(text for text in status if text.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# Checks ------------------------------------------------------------------------------------------

def for_the_cpu(prompt: dict) -> dict:
    """Small sizes and few steps, so that full-size SD 1.5 runs in seconds on a CPU."""
    prompt = copy.deepcopy(prompt)
    for entry in prompt.values():
        inputs = entry["inputs"]
        if entry["class_type"] in ("DMPPredict", "DMPPredictTasks"):
            inputs["processing_resolution"] = 64
        elif entry["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = 64
        elif entry["class_type"] == "KSampler":
            inputs["steps"] = 3
    return prompt


def node_of(prompt: dict, class_type: str, nth: int = 0) -> str:
    return [k for k, v in prompt.items() if v["class_type"] == class_type][nth]


def check_success(server: Server, base: Path, name: str, prompt: dict) -> str:
    """Run a prompt; every preview and saved file must arrive. Returns a one-line report."""
    return run_success(server, base, name, prompt)[0]


def run_success(server: Server, base: Path, name: str, prompt: dict) -> tuple[str, dict]:
    """``check_success``, also returning the prompt's history entry (its outputs)."""
    started = time.monotonic()
    status, reply = server.submit(prompt)
    if status != 200 or reply.get("node_errors"):
        raise AssertionError(f"{name}: rejected ({status}): {json.dumps(reply)[:2000]}")
    result = server.result(reply["prompt_id"])
    if result["status"]["status_str"] != "success":
        raise AssertionError(f"{name}: {json.dumps(result['status']['messages'])[:3000]}")
    check_messages(name, prompt, server.messages(reply["prompt_id"]))
    outputs, previews, videos = result["outputs"], 0, 0
    for node_id, entry in prompt.items():
        if entry["class_type"] in ("PreviewImage", "SaveImage", "DMPSave"):
            images = outputs.get(node_id, {}).get("images", [])
            if not images:
                raise AssertionError(f"{name}: no images from {entry['class_type']} {node_id}")
            query = urllib.parse.urlencode({k: images[0][k] for k in ("filename", "subfolder", "type")})
            if not server.get(f"/view?{query}").startswith(b"\x89PNG"):
                raise AssertionError(f"{name}: /view did not return a PNG for node {node_id}")
            previews += len(images)
        if entry["class_type"] == "DMPSave":
            for file in outputs[node_id]["dmp_files"]:
                if not (base / "output" / file["subfolder"] / file["filename"]).is_file():
                    raise AssertionError(f"{name}: {file} was not written")
        if entry["class_type"] == "PreviewAny" and not outputs.get(node_id, {}).get("text"):
            raise AssertionError(f"{name}: no text from PreviewAny {node_id}")
        if entry["class_type"] == "SaveVideo":
            check_saved_video(name, base, outputs.get(node_id, {}))
            videos += 1
    saved = f"{previews} images" + (f", {videos} videos of {VIDEO_FRAMES} frames" if videos else "")
    return f"ok    {name}: {saved} in {time.monotonic() - started:.1f} s", result


def check_saved_video(name: str, base: Path, output: dict) -> None:
    """A saved video holds as many frames as the example clip (read with PyAV)."""
    from dmp_model.io.video import probe_video

    files = output.get("images", [])
    if not files:
        raise AssertionError(f"{name}: SaveVideo reported no file")
    path = base / "output" / files[0]["subfolder"] / files[0]["filename"]
    frames = probe_video(path).frames
    if frames != VIDEO_FRAMES:
        raise AssertionError(f"{name}: {path.name} has {frames} frames, the input clip {VIDEO_FRAMES}")


def check_messages(name: str, prompt: dict, messages: list[dict]) -> None:
    """What the UI sees: a progress bar per DMP prediction reaching its end, and every output
    node's 'executed' message (its previews) for the nodes that ran."""
    ran = {m["data"]["node"] for m in messages if m["type"] == "executing" and m["data"]["node"]}
    progress = {}
    for message in messages:
        if message["type"] == "progress":
            progress.setdefault(message["data"]["node"], []).append(
                (message["data"]["value"], message["data"]["max"]))
    executed = {m["data"]["node"] for m in messages if m["type"] == "executed"}
    for node_id, entry in prompt.items():
        if node_id not in ran:
            continue  # cached from an earlier run
        if entry["class_type"] in ("DMPPredict", "DMPPredictTasks"):
            steps = progress.get(node_id, [])
            if not steps or steps[-1][0] != steps[-1][1] or len(steps) < 2:
                raise AssertionError(f"{name}: progress of {entry['class_type']} {node_id}: {steps}")
        shows = entry["class_type"] in ("PreviewImage", "SaveImage", "DMPSave", "PreviewAny")
        if shows and node_id not in executed:
            raise AssertionError(f"{name}: no 'executed' message from {entry['class_type']} {node_id}")


def check_error(server: Server, name: str, prompt: dict, node_type: str, message: str) -> str:
    """Run a prompt that must fail in `node_type` with `message` in the execution error."""
    status, reply = server.submit(prompt)
    if status != 200:
        raise AssertionError(f"{name}: rejected before running ({status}): {json.dumps(reply)[:1000]}")
    result = server.result(reply["prompt_id"])
    server.messages(reply["prompt_id"])
    errors = [m[1] for m in result["status"]["messages"] if m[0] == "execution_error"]
    if result["status"]["status_str"] != "error" or not errors:
        raise AssertionError(f"{name}: expected an execution error, got {result['status']}")
    error = errors[0]
    if error["node_type"] != node_type or message not in error["exception_message"]:
        raise AssertionError(f"{name}: unexpected error in {error['node_type']}: "
                             f"{error['exception_message']}")
    return f"ok    {name}: {error['exception_type']} in {node_type}: {error['exception_message'][:150]}"


def check_rejected(server: Server, name: str, prompt: dict, detail: str) -> str:
    """Submit a prompt the server must refuse at validation (a model name not in the list)."""
    status, reply = server.submit(prompt)
    errors = json.dumps(reply.get("node_errors", {}))
    if status != 400 or detail not in errors:
        raise AssertionError(f"{name}: expected a validation error, got {status}: {errors[:1000]}")
    return f"ok    {name}: rejected with 'Value not in list' ({detail})"


def check_frontend(server: Server, chromium: str, info: dict, snapshot: str | None = None) -> list[str]:
    """ComfyUI's own frontend must turn each example into the API prompt our converter makes, and so
    must our converter the frontend's own save of it (widgets_values_named included, where written).

    With `snapshot` (a version in tests/support/comfy_stubs/core_nodes), the page and the converter see that
    core's node schemas in place of the server's: the frontend is checked against a newer core's
    schemas (DynamicCombo, new optional widgets) which this server cannot run.
    """
    from comfy_stubs.frontend import Frontend, compare, with_core_snapshot
    from comfy_stubs.workflow_api import core_node_info, core_snapshot_source

    rewrite = None if snapshot is None else (lambda live: with_core_snapshot(live, core_node_info(snapshot)))
    info = info if rewrite is None else rewrite(info)
    frontend = Frontend(chromium, server.url, port=server.port + 1, object_info=rewrite)
    report = []
    try:
        where = f"frontend {frontend.version}, {'core schemas ' + snapshot if snapshot else 'the server'}"
        needed = core_snapshot_source(snapshot)["frontend"] if snapshot else None
        if needed and _version(frontend.version) < _version(needed):
            # An older frontend does not know the newer input types (it drops DynamicCombo widgets).
            return [f"skip  {where}: that core pins frontend {needed}; pass --front-end-root"]
        for path in sorted(WORKFLOWS.glob("*.json")):
            workflow = json.loads(path.read_text(encoding="utf-8"))
            theirs = frontend.api_prompt(workflow)
            problems = compare(to_api(workflow, info), theirs, info)
            if problems:
                raise AssertionError(f"{path.stem} ({where}): the frontend disagrees: {problems}")
            resaved = compare(to_api(frontend.saved_workflow(), info), theirs, info)
            if resaved:
                raise AssertionError(f"{path.stem} ({where}): the frontend's own save converts otherwise: {resaved}")
            report.append(f"ok    {path.stem} ({where}): graphToPrompt() gives our API prompt, from the file "
                          f"and from the frontend's re-save")
        if frontend.errors:  # e.g. endpoints a newer frontend asks for which this server lacks
            report.append(f"note  {where}: the page logged {len(frontend.errors)} errors: "
                          f"{sorted({e.split(chr(10))[0] for e in frontend.errors})}")
    finally:
        frontend.close()
    return report


def _version(text: str) -> tuple[int, ...]:
    """'1.58.1' -> (1, 58, 1); anything unreadable sorts first."""
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return ()


def saved_files(base: Path, result: dict, prompt: dict, suffix: str) -> list[Path]:
    """The files DMP Save nodes of a finished prompt wrote, with the given suffix."""
    return [base / "output" / f["subfolder"] / f["filename"] for node_id, entry in prompt.items()
            if entry["class_type"] == "DMPSave" for f in result["outputs"][node_id]["dmp_files"]
            if f["filename"].endswith(suffix)]


def check_library_parity(base: Path, name: str, prompt: dict, result: dict) -> str:
    """Workflow 1's raw depth (.npy) against DMPModel.predict on the same checkpoint, adapter, image, settings."""
    import numpy as np
    import torch

    from dmp_model import DMPModel
    from dmp_model.images import load_image

    (saved,) = saved_files(base, result, prompt, ".npy")
    predict = next(e["inputs"] for e in prompt.values()
                   if e["class_type"] == "DMPPredict" and e["inputs"]["task"] == "depth")
    adapter = next(e["inputs"]["adapter"] for e in prompt.values() if e["class_type"] == "DMPLoadAdapter"
                   and e["inputs"]["adapter"].startswith("depth"))
    model = DMPModel.from_pretrained(base / "models" / "checkpoints" / CHECKPOINT, device="cpu", precision="fp32")
    model.load_adapter(base / "models" / "dmp" / adapter)
    image = load_image(base / "input" / "example.png")
    settings = {k: predict[k] for k in ("steps", "sampler", "spacing", "processing_resolution", "batch_size")}
    with torch.no_grad():
        expected = model.predict(image, **settings).raw[0].numpy()
    ours = np.load(saved)
    span = float(expected.max() - expected.min())
    error = float(np.abs(ours - expected).max()) / max(span, 1e-12)
    if ours.shape != expected.shape or not error <= PARITY_TOLERANCE:
        raise AssertionError(f"{name}: node depth {ours.shape} differs from the library's {expected.shape} by "
                             f"{error:.2e} of the depth range {span:.3f} m (allowed {PARITY_TOLERANCE})")
    return f"ok    {name}: equals DMPModel.predict to {error:.1e} of the depth range ({span:.2f} m)"


def check_asset(base: Path, name: str, prompt: dict, result: dict) -> str:
    """Workflow 6's .glb read back independently: triangles, unit normals, a texture of the image's size, and
    Preview 3D given its path."""
    import numpy as np
    from PIL import Image

    from asset_readers import Glb

    node = node_of(prompt, "DMPTo3D")
    (file,) = result["outputs"][node]["dmp_files"]
    path = base / "output" / file["subfolder"] / file["filename"]
    glb = Glb(path)
    vertices = faces = 0
    for _part, primitive in glb.primitives():
        positions, normals = (glb.accessor(primitive["attributes"][k]) for k in ("POSITION", "NORMAL"))
        if not (np.isfinite(positions).all() and np.allclose(np.linalg.norm(normals, axis=1), 1, atol=1e-4)):
            raise AssertionError(f"{name}: {path.name} has non-finite positions or normals not of unit length")
        vertices, faces = vertices + len(positions), faces + len(glb.accessor(primitive["indices"])) // 3
    with Image.open(base / "input" / "example.png") as image:
        size = image.size
    if faces == 0 or glb.image().size != size:
        raise AssertionError(f"{name}: {path.name} has {faces} triangles and a {glb.image().size} texture; "
                             f"expected triangles and the image's size {size}")
    shown = result["outputs"][node_of(prompt, "Preview3D")]["result"][0]
    if shown != f"{file['subfolder']}/{file['filename']}":
        raise AssertionError(f"{name}: Preview 3D was given {shown!r}, not the file written ({file})")
    return (f"ok    {name}: {file['subfolder']}/{file['filename']} re-read: {vertices} vertices, {faces} triangles, "
            f"unit normals, texture {size[0]} x {size[1]}, {path.stat().st_size / 1024:.0f} KiB")


def check_preview_3d(server: Server, chromium: str, base: Path, workflow: dict, output: dict) -> str:
    """ComfyUI's frontend shows workflow 6's asset in core's Preview 3D widget; a screenshot is kept for a person.

    The widget is handed the server's output for its node as the frontend does on an "executed"
    message (``node.onExecuted``); it must then fetch the file through /view.
    """
    from comfy_stubs.frontend import Frontend

    def wait_for(expression: str, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not frontend.evaluate(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"Preview 3D: {what} within {timeout:.0f} s")
            time.sleep(1)

    frontend = Frontend(chromium, server.url)
    screenshot, name = base / "preview3d.png", output["result"][0].rsplit("/", 1)[-1]
    node_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "Preview3D")
    node = f"window.app.graph.getNodeById({node_id})"
    try:
        frontend.set_viewport(1280, 900)
        frontend.evaluate(f"window.app.loadGraphData({json.dumps(workflow)})")
        # In view at scale 1, so that the widget mounts its viewer (which then takes over onExecuted).
        frontend.evaluate(f"(() => {{ const c = window.app.canvas; c.ds.scale = 1; c.centerOnNode({node}); "
                          "c.setDirty(true, true); })()")
        # The extension sets the node's own onExecuted once its viewer is up (before, the class's answers).
        wait_for(f"Object.prototype.hasOwnProperty.call({node}, 'onExecuted')", "the widget's viewer did not start")
        # Chromium keeps 250 resource entries by default, and the frontend's own module loads fill them:
        # without room, the widget's fetch of the file would never show in the list waited on below.
        frontend.evaluate("performance.clearResourceTimings(); performance.setResourceTimingBufferSize(10000)")
        frontend.evaluate(f"{node}.onExecuted({json.dumps(output)})")
        wait_for(f"performance.getEntriesByType('resource').some(e => e.name.includes({json.dumps(name)}))",
                 f"the frontend did not fetch {name}")
        time.sleep(5)  # the viewer parses the file and renders it (SwiftShader WebGL in headless Chromium)
        frontend.screenshot(screenshot)
    finally:
        frontend.close()
    return f"ok    Preview 3D fetched {name}; screenshot {screenshot}"


def check_one_base_load(server: Server, base: Path, name: str, prompt: dict) -> str:
    """Generation and DMP on one checkpoint: the graph loads one model (one 'model_type' line in the log)."""
    requests = urllib.request.Request(server.url + "/free", data=json.dumps({"unload_models": True,
                                      "free_memory": True}).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(requests, timeout=30).close()  # no cached outputs: the checkpoint loads again
    # ComfyUI's worker acts on /free after the prompt it runs next: run a small one first, so that the
    # cache is empty when the graph under test starts (else it would reuse the loaded checkpoint).
    small = {"image": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
             "preview": {"class_type": "PreviewImage", "inputs": {"images": ["image", 0]}}}
    check_success(server, base, "after /free", small)
    server.log.flush()
    start = Path(server.log.name).stat().st_size
    line = check_success(server, base, name, prompt)
    server.log.flush()
    with open(server.log.name, encoding="utf-8", errors="replace") as log:
        log.seek(start)
        loads = sum(1 for text in log if text.startswith("model_type "))
    if loads != 1:
        raise AssertionError(f"{name}: {loads} models were loaded; generation and DMP must share one")
    return f"{line}; 1 model loaded for generation and DMP, server RSS {server.rss_mb():.0f} MB"


def check_interrupt(server: Server, name: str, prompt: dict) -> str:
    """Cancel during DMP sampling: the run stops within one sampler step."""
    status, reply = server.submit(prompt)
    if status != 200:
        raise AssertionError(f"{name}: rejected ({status}): {json.dumps(reply)[:1000]}")
    at_cancel, last, total = None, 0, None
    while True:
        message = json.loads(server.socket.receive())
        data = message.get("data", {})
        if data.get("prompt_id") != reply["prompt_id"]:
            continue
        if message["type"] == "progress":
            last, total = data["value"], data["max"]
            if at_cancel is None and last >= 2:
                at_cancel = last
                urllib.request.urlopen(urllib.request.Request(server.url + "/interrupt", data=b"{}"), timeout=30)
        if message["type"] in ("execution_success", "execution_error", "execution_interrupted"):
            break
    if message["type"] != "execution_interrupted" or at_cancel is None or last > at_cancel + 1:
        raise AssertionError(f"{name}: {message['type']}, cancelled at step {at_cancel}, last step {last}")
    return f"ok    {name}: cancelled at step {at_cancel} of {total}, stopped at step {last}"


def check_memory_flat(server: Server, base: Path, name: str, prompt: dict, runs: int = 20) -> str:
    """Repeated DMP runs (a changed setting each time, so nothing is cached) keep the server's memory flat."""
    predict = node_of(prompt, "DMPPredict")
    sizes = []
    for run in range(runs):
        changed = copy.deepcopy(prompt)
        changed[predict]["inputs"]["batch_size"] = 2 + run % 2
        check_success(server, base, f"{name} #{run + 1}", changed)
        sizes.append(server.rss_mb())
    growth = max(sizes[5:]) - sizes[4]
    if growth > 150:
        raise AssertionError(f"{name}: the server's memory grew by {growth:.0f} MB over runs 6-{runs}: {sizes}")
    return (f"ok    {name}: {runs} runs, RSS {sizes[0]:.0f} MB after the first, {sizes[4]:.0f} after 5, "
            f"{sizes[-1]:.0f} after {runs} (largest growth after run 5: {growth:+.0f} MB)")


def with_unet_loader(prompt: dict, unet: str, weight_dtype: str) -> dict:
    """The prompt with every Load DMP Adapter fed by core's UNet loader instead of the checkpoint's MODEL."""
    prompt = copy.deepcopy(prompt)
    prompt["900"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": weight_dtype}}
    for entry in prompt.values():
        if entry["class_type"] == "DMPLoadAdapter":
            entry["inputs"]["model"] = ["900", 0]
    return prompt


class Report(list):
    """The report's lines, each printed as it comes (a run takes minutes)."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)

    def extend(self, lines) -> None:
        for line in lines:
            self.append(line)


def run_checks(server: Server, base: Path, as_shipped: bool = False,
               chromium: str | None = None) -> list[str]:
    info = server.get("/object_info")
    shrink = (lambda p: p) if as_shipped else for_the_cpu
    workflows = {p.stem: shrink(to_api(json.loads(p.read_text(encoding="utf-8")), info))
                 for p in sorted(WORKFLOWS.glob("*.json"))}
    report = Report()
    if chromium:
        for snapshot in (None, *NEWER_SNAPSHOTS):
            report.extend(check_frontend(server, chromium, info, snapshot))
    first = workflows["1_depth_normals_to_controlnet"]
    # 1. Every example workflow on full-size SD 1.5 models; workflow 1 against the library; one base load.
    preview = None  # workflow 6 and its Preview 3D output, for the browser check at the end
    for name, prompt in workflows.items():
        if name.startswith("2_"):
            report.append(check_one_base_load(server, base, name, prompt))
            continue
        line, result = run_success(server, base, name, prompt)
        report.append(line)
        if name.startswith("1_"):
            report.append(check_library_parity(base, f"{name}, raw depth", prompt, result))
        if name.startswith("6_"):
            report.append(check_asset(base, name, prompt, result))
            preview = (json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8")),
                       result["outputs"][node_of(prompt, "Preview3D")])
    # 2. Prompts (ComfyUI's tokenizer, CLIP Text Encode's CONDITIONING), other loaders and folders.
    texted = copy.deepcopy(first)
    texted[node_of(texted, "DMPPredict")]["inputs"]["prompt"] = "a bedroom with a large bed"
    report.append(check_success(server, base, "1 with a text prompt", texted))
    conditioned = copy.deepcopy(workflows["4_segmentation_mask_inpainting"])
    conditioned[node_of(conditioned, "DMPPredict")]["inputs"]["conditioning"] = [
        node_of(conditioned, "CLIPTextEncode"), 0]
    report.append(check_success(server, base, "4 with CLIP Text Encode's conditioning", conditioned))
    report.append(check_success(server, base, "1 on core's UNet loader, fp8 weights",
                                with_unet_loader(first, CHECKPOINT, "fp8_e4m3fn")))
    extra = copy.deepcopy(first)
    extra[node_of(extra, "DMPLoadAdapter", 1)]["inputs"]["adapter"] = EXTRA_ADAPTER
    report.append(check_success(server, base, "1 with an adapter from extra_model_paths.yaml", extra))
    large = copy.deepcopy(first)  # 96 x 64 at 32 px: a global pass and 12 tiles, each a flip ensemble
    predict_id = node_of(large, "DMPPredict")
    large[predict_id]["inputs"].update(processing_resolution=32, tile=True, ensemble="flip")
    large["uncertainty-preview"] = {"class_type": "PreviewImage", "inputs": {"images": [predict_id, 2]}}
    report.append(check_success(server, base, "1 tiled, as a flip ensemble, uncertainty previewed", large))
    # 3. Bad input: execution errors with actionable messages, and the server goes on.
    report.append(check_error(server, "an SD 2.x UNet as the base", with_unet_loader(first, SD2_UNET, "default"),
                              "DMPLoadAdapter", "DMP needs a Stable Diffusion 1.x model"))
    for label, adapter, message in [("an SDXL LoRA", SDXL_LORA, "adapter does not fit this model: 1 of 3"),
                                    ("a corrupt adapter file", BROKEN["corrupt"], "corrupt.safetensors"),
                                    ("a truncated adapter file", BROKEN["truncated"], "truncated.safetensors"),
                                    ("a pickle with code", BROKEN["pickled"], "not loaded for safety")]:
        bad = copy.deepcopy(first)
        bad[node_of(bad, "DMPLoadAdapter")]["inputs"]["adapter"] = adapter
        report.append(check_error(server, label, bad, "DMPLoadAdapter", message))
    bad = copy.deepcopy(workflows["3_all_five_tasks"])
    bad[node_of(bad, "DMPSegmentation")]["inputs"]["classes"] = "wall, sofas"
    report.append(check_error(server, "unknown class name", bad, "DMPSegmentation",
                              "All valid names: wall, building"))
    bad = copy.deepcopy(first)
    depth_predict = next(k for k, v in bad.items() if v["class_type"] == "DMPPredict"
                         and v["inputs"]["task"] == "depth")
    bad[node_of(bad, "DMPNormalsToControlNet")]["inputs"]["prediction"] = [depth_predict, 1]
    report.append(check_error(server, "depth into the normals node", bad, "DMPNormalsToControlNet",
                              "needs a normal prediction, but got a depth prediction"))
    bad = copy.deepcopy(first)
    bad[node_of(bad, "DMPLoadAdapter")]["inputs"]["adapter"] = "missing/pytorch_lora_weights.safetensors"
    report.append(check_rejected(server, "missing adapter file", bad, "missing/pytorch_lora_weights.safetensors"))
    # 4. Cancel within a step; the server's memory over repeated runs; and it still works.
    slow = copy.deepcopy(first)
    slow[node_of(slow, "DMPPredict")]["inputs"].update(steps=40, spacing="trailing")
    report.append(check_interrupt(server, "Cancel during DMP sampling", slow))
    report.append(check_memory_flat(server, base, "1 repeated", first))
    again = copy.deepcopy(first)
    again[node_of(again, "DMPDepthToControlNet")]["inputs"]["invert"] = True  # not a cached result
    report.append(check_success(server, base, "after the errors, 1 again", again))
    # Last: the viewer in a browser (the server's checks above do not depend on it).
    if chromium and preview is not None:
        report.append(check_preview_3d(server, chromium, base, *preview))
    return report


# Core nodes the example workflows do not use yet but whose schema the tests follow (Preview3D: 3D previews).
ALSO_DUMPED = ("Preview3D",)
# Combos that list files of the install: the snapshot names the folder instead.
FILE_COMBOS = {("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
               ("ControlNetLoader", "control_net_name"): "controlnet", ("LoadImage", "image"): "input",
               ("LoadVideo", "file"): "input"}


def _without_tooltips(inputs: dict) -> dict:
    """An input dict (and the inputs of DynamicCombo options in it) without tooltips, which change often."""
    for specs in inputs.values():
        for spec in specs.values() if isinstance(specs, dict) else ():
            if len(spec) > 1 and isinstance(spec[1], dict):
                spec[1].pop("tooltip", None)
                for option in spec[1].get("options", []):
                    if isinstance(option, dict) and "inputs" in option:
                        _without_tooltips(option["inputs"])
    return inputs


def dump_core_nodes(server: Server, comfyui: Path) -> Path:
    """Write tests/support/comfy_stubs/core_nodes/<core version>.json from the server: the object_info of the
    core nodes the workflows use (and ALSO_DUMPED), with where it came from."""
    info = server.get("/object_info")
    used = {n["type"] for p in WORKFLOWS.glob("*.json") for n in json.loads(p.read_text())["nodes"]} | set(ALSO_DUMPED)
    core = sorted(used & {k for k, v in info.items() if not v["python_module"].startswith("custom_nodes")})
    nodes = {}
    for name in core:
        keys = ("input", "input_order", "output", "output_name", "name", "category", "output_node")
        entry = {k: info[name][k] for k in keys}
        for specs in entry["input"].values():
            for input_name, spec in specs.items():
                if (name, input_name) in FILE_COMBOS:
                    spec[0] = {"files": FILE_COMBOS[name, input_name]}
        _without_tooltips(entry["input"])
        nodes[name] = entry
    system = server.get("/system_stats")["system"]
    commit = subprocess.run(["git", "-C", str(comfyui), "rev-parse", "HEAD"], capture_output=True, text=True)
    source = {"core": system["comfyui_version"], "commit": commit.stdout.strip() or None,
              "frontend": system.get("required_frontend_version"), "date": time.strftime("%Y-%m-%d"),
              "how": "GET /object_info of that ComfyUI server: tests/comfy_e2e.py --dump-core-nodes"}
    document = {"comment": "object_info of the ComfyUI core nodes used by example_workflows/ (and Preview3D), "
                           "tooltips removed; combos listing model or input files are replaced by "
                           "{'files': <folder>}. See README.md here.",
                "source": source, "nodes": nodes}
    target = ROOT / "tests" / "support" / "comfy_stubs" / "core_nodes" / f"{system['comfyui_version']}.json"
    target.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_E2E_PATH"), required=False,
                        help="ComfyUI checkout (main.py)")
    parser.add_argument("--python", default=os.environ.get("COMFYUI_E2E_PYTHON", sys.executable),
                        help="Python with ComfyUI's requirements (the pack needs nothing more); this script's "
                             "own Python needs the library's (diffusers, peft) to make models and compare")
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dmp-comfy-e2e",
                        help="where the full-size random models are kept between runs (about 5 GB)")
    parser.add_argument("--keep", action="store_true", help="keep the base directory (and its server.log)")
    parser.add_argument("--as-shipped", action="store_true", help="run the workflows at their own sizes")
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="Chromium for the frontend check (skipped without one)")
    parser.add_argument("--front-end-root", type=Path, default=None,
                        help="serve this frontend (the 'static' folder of a comfyui-frontend-package) instead "
                             "of the one installed with ComfyUI")
    parser.add_argument("--only-frontend", action="store_true",
                        help="run only the frontend check (no workflow is run); needs --browser")
    parser.add_argument("--dump-core-nodes", action="store_true",
                        help="also write tests/support/comfy_stubs/core_nodes/<version>.json from the server")
    args = parser.parse_args(argv)
    if args.comfyui is None or not (args.comfyui / "main.py").is_file():
        parser.error("--comfyui must name a ComfyUI checkout (or set COMFYUI_E2E_PATH)")
    if args.front_end_root is not None and not (args.front_end_root / "index.html").is_file():
        parser.error(f"--front-end-root {args.front_end_root} has no index.html; give the 'static' folder of "
                     "comfyui_frontend_package (pip install --target DIR comfyui-frontend-package)")
    if args.only_frontend and not args.browser:
        parser.error("--only-frontend needs Chromium: pass --browser")
    base = Path(tempfile.mkdtemp(prefix="dmp-comfy-e2e-"))
    server = None
    try:
        extra_paths = prepare_base(base, args.cache)
        server = Server(args.comfyui.resolve(), args.python, base, extra_paths, args.port, args.front_end_root)
        server.wait_ready()
        server.listen()
        if args.dump_core_nodes:
            print(f"wrote {dump_core_nodes(server, args.comfyui)}", flush=True)
        if args.only_frontend:
            report = Report()
            for snapshot in (None, *NEWER_SNAPSHOTS):
                report.extend(check_frontend(server, args.browser, server.get("/object_info"), snapshot))
        else:
            report = run_checks(server, base, args.as_shipped, args.browser)
        print(f"{sum(line.startswith('ok') for line in report)} passed, 0 failed")
        return 0
    except AssertionError as err:
        print(f"FAILED {err}\nserver log: {base / 'server.log'}")
        args.keep = True
        return 1
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base}")


def test_comfy_e2e():
    """The same run as a pytest test, when COMFYUI_E2E_PATH names a ComfyUI checkout."""
    import pytest

    if not os.environ.get("COMFYUI_E2E_PATH"):
        pytest.skip("set COMFYUI_E2E_PATH (and COMFYUI_E2E_PYTHON) to run ComfyUI end to end")
    assert main([]) == 0


if __name__ == "__main__":
    sys.exit(main())
