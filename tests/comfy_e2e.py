"""End to end: the pack in a real ComfyUI server on the CPU, driven through its HTTP API.

    .venv/bin/python tests/comfy_e2e.py --comfyui /path/to/ComfyUI --python /path/to/comfy-venv/bin/python

It makes a throw-away ComfyUI base directory (``--base-directory``) with the pack linked into
custom_nodes/ and random-weight models under the names the example workflows use:

- full-size SD 1.5 models (a single-file checkpoint, a depth ControlNet, five adapters) that
  ComfyUI's own loaders accept, cached in --cache (about 3 GB, made once in about a minute);
- tiny models (a diffusers base, adapters) found through an extra_model_paths.yaml 'dmp:' entry.

Each example workflow is converted from the UI format to the API format with the server's own
/object_info (and, where Chromium is installed, the result must equal what ComfyUI's own
frontend makes of the workflow, ``app.graphToPrompt()``), submitted to /prompt and awaited in
/history; every preview must come back through
/view and every saved file must exist. Resolutions and sampler steps are lowered for the CPU
(--as-shipped keeps them). Bad input must come back as ComfyUI execution errors with the expected
messages, and the server must go on working. The run prints a summary and exits non-zero on any
failure.

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
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from comfy_stubs.model_files import (ADAPTER_FILE, ADAPTERS, TINY_BASE,  # noqa: E402
                                     write_official_adapter, write_tiny_models)
from comfy_stubs.workflow_api import to_api  # noqa: E402

WORKFLOWS = ROOT / "example_workflows"
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
CONTROLNET = "control_v11f1p_sd15_depth_fp16.safetensors"
SD1_CONFIG = ROOT / "dmp_model" / "configs" / "sd1"


# Models ------------------------------------------------------------------------------------------

def make_full_size_models(cache: Path) -> Path:
    """Random-weight SD 1.5 models in the real layouts (made once): checkpoints/, controlnet/, dmp/."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from ldm_layout import write_single_file
    from transformers import CLIPTextConfig, CLIPTextModel

    done = cache / "complete"
    if done.is_file():
        return cache
    print(f"making full-size random SD 1.5 models in {cache} (once)", flush=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD1_CONFIG, subfolder="unet"))
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
    done.touch()
    return cache


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def prepare_base(base: Path, cache: Path) -> Path:
    """A ComfyUI base directory: the pack in custom_nodes, full-size models, an input image, and
    an extra_model_paths.yaml naming the tiny models (returns the yaml)."""
    from PIL import Image

    models = base / "models"
    full = make_full_size_models(cache)
    for folder in ("checkpoints", "controlnet", "dmp"):
        shutil.copytree(full / folder, models / folder, dirs_exist_ok=True, copy_function=_link_or_copy)
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "ComfyUI-DMP").symlink_to(ROOT, target_is_directory=True)
    (base / "input").mkdir(exist_ok=True)
    gradient = Image.linear_gradient("L").resize((96, 64)).convert("RGB")
    gradient.save(base / "input" / "example.png")
    tiny = base / "tiny" / "models"
    write_tiny_models(tiny, adapter_folder="tiny")
    yaml = base / "extra_model_paths.yaml"
    yaml.write_text(f"dmp_e2e:\n    base_path: {tiny}\n    dmp: dmp\n    diffusers: diffusers\n"
                    "    checkpoints: checkpoints\n", encoding="utf-8")
    return yaml


# Server ------------------------------------------------------------------------------------------

class Server:
    """A ComfyUI server process on 127.0.0.1 and the few API calls the checks need."""

    def __init__(self, comfyui: Path, python: str, base: Path, extra_paths: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(base / "server.log", "w", encoding="utf-8")
        command = [python, str(comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                   "--base-directory", str(base), "--extra-model-paths-config", str(extra_paths),
                   "--disable-auto-launch"]
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


def use_tiny_models(prompt: dict) -> dict:
    """Point every DMP loader at the tiny diffusers base and the tiny adapters."""
    prompt = copy.deepcopy(prompt)
    for entry in prompt.values():
        if entry["class_type"] == "DMPLoader":
            entry["inputs"]["base"] = f"diffusers/{TINY_BASE}"
            for key, value in entry["inputs"].items():
                if key.startswith("adapter") and value != "none":
                    entry["inputs"][key] = f"tiny/{value}"
    return prompt


def node_of(prompt: dict, class_type: str, nth: int = 0) -> str:
    return [k for k, v in prompt.items() if v["class_type"] == class_type][nth]


def check_success(server: Server, base: Path, name: str, prompt: dict) -> str:
    """Run a prompt; every preview and saved file must arrive. Returns a one-line report."""
    started = time.monotonic()
    status, reply = server.submit(prompt)
    if status != 200 or reply.get("node_errors"):
        raise AssertionError(f"{name}: rejected ({status}): {json.dumps(reply)[:2000]}")
    result = server.result(reply["prompt_id"])
    if result["status"]["status_str"] != "success":
        raise AssertionError(f"{name}: {json.dumps(result['status']['messages'])[:3000]}")
    check_messages(name, prompt, server.messages(reply["prompt_id"]))
    outputs, previews = result["outputs"], 0
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
    return f"ok    {name}: {previews} images in {time.monotonic() - started:.1f} s"


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


def check_frontend(server: Server, chromium: str, info: dict) -> list[str]:
    """ComfyUI's own frontend must turn each example into the API prompt our converter makes."""
    from comfy_stubs.frontend import Frontend, compare

    frontend = Frontend(chromium, server.url)
    report = []
    try:
        for path in sorted(WORKFLOWS.glob("*.json")):
            workflow = json.loads(path.read_text(encoding="utf-8"))
            problems = compare(to_api(workflow, info), frontend.api_prompt(workflow), info)
            if problems:
                raise AssertionError(f"{path.stem}: the frontend disagrees: {problems}")
            report.append(f"ok    {path.stem}: the frontend's graphToPrompt() gives the same API prompt")
    finally:
        frontend.close()
    return report


def run_checks(server: Server, base: Path, as_shipped: bool = False,
               chromium: str | None = None) -> list[str]:
    info = server.get("/object_info")
    shrink = (lambda p: p) if as_shipped else for_the_cpu
    workflows = {p.stem: shrink(to_api(json.loads(p.read_text(encoding="utf-8")), info))
                 for p in sorted(WORKFLOWS.glob("*.json"))}
    report = check_frontend(server, chromium, info) if chromium else []
    # 1. Every example workflow as shipped, on full-size SD 1.5 models.
    for name, prompt in workflows.items():
        report.append(check_success(server, base, name, prompt))
    # 2. Prompts: text through ComfyUI's SD 1.x tokenizer, and CLIP Text Encode's CONDITIONING.
    first, third = workflows["1_depth_normals_to_controlnet"], workflows["3_all_five_tasks"]
    texted = copy.deepcopy(first)
    texted[node_of(texted, "DMPPredict")]["inputs"]["prompt"] = "a bedroom with a large bed"
    report.append(check_success(server, base, "1 with a text prompt", texted))
    conditioned = copy.deepcopy(workflows["4_segmentation_mask_inpainting"])
    conditioned[node_of(conditioned, "DMPPredict")]["inputs"]["conditioning"] = [
        node_of(conditioned, "CLIPTextEncode"), 0]
    report.append(check_success(server, base, "4 with CLIP Text Encode's conditioning", conditioned))
    # 3. The DMP-only workflows on the tiny models of extra_model_paths.yaml (diffusers base).
    report.append(check_success(server, base, "1 on tiny models", use_tiny_models(first)))
    report.append(check_success(server, base, "3 on tiny models", use_tiny_models(third)))
    # 4. Bad input: execution errors with actionable messages, and the server goes on.
    bad = use_tiny_models(third)
    bad[node_of(bad, "DMPSegmentation")]["inputs"]["classes"] = "wall, sofas"
    report.append(check_error(server, "unknown class name", bad, "DMPSegmentation",
                              "All valid names: wall, building"))
    bad = copy.deepcopy(first)
    bad[node_of(bad, "DMPLoader")]["inputs"]["base"] = "sdxl_base_1.0.safetensors"
    report.append(check_error(server, "SDXL as base", bad, "DMPLoader", "DMP needs a Stable Diffusion 1.x"))
    bad = use_tiny_models(first)
    bad[node_of(bad, "DMPLoader")]["inputs"]["adapter_2"] = f"tiny/depth-other-base/{ADAPTER_FILE}"
    report.append(check_error(server, "adapter of another base", bad, "DMPLoader", "adapter does not fit"))
    bad = use_tiny_models(first)
    depth_predict = next(k for k, v in bad.items() if v["class_type"] == "DMPPredict"
                         and v["inputs"]["task"] == "depth")
    bad[node_of(bad, "DMPNormalsToControlNet")]["inputs"]["prediction"] = [depth_predict, 1]
    report.append(check_error(server, "depth into the normals node", bad, "DMPNormalsToControlNet",
                              "needs a normal prediction, but got a depth prediction"))
    bad = copy.deepcopy(first)
    bad[node_of(bad, "DMPLoader")]["inputs"]["base"] = "missing.safetensors"
    report.append(check_rejected(server, "missing base file", bad, "missing.safetensors"))
    again = use_tiny_models(first)
    again[node_of(again, "DMPDepthToControlNet")]["inputs"]["invert"] = True  # not a cached result
    report.append(check_success(server, base, "after the errors, 1 again", again))
    return report


def dump_core_nodes(server: Server, target: Path) -> None:
    """Refresh tests/comfy_stubs/core_nodes.json from the server (the core nodes the workflows use)."""
    info = server.get("/object_info")
    used = sorted({n["type"] for p in WORKFLOWS.glob("*.json") for n in json.loads(p.read_text())["nodes"]}
                  & {k for k, v in info.items() if not v["python_module"].startswith("custom_nodes")})
    files = {("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
             ("ControlNetLoader", "control_net_name"): "controlnet", ("LoadImage", "image"): "input"}
    nodes = {}
    for name in used:
        keys = ("input", "input_order", "output", "output_name", "name", "category", "output_node")
        entry = {k: info[name][k] for k in keys}
        for specs in entry["input"].values():
            for input_name, spec in specs.items():
                if (name, input_name) in files:
                    spec[0] = {"files": files[name, input_name]}
                if len(spec) > 1 and isinstance(spec[1], dict):
                    spec[1].pop("tooltip", None)
        nodes[name] = entry
    document = json.loads(target.read_text(encoding="utf-8"))
    document["nodes"] = nodes
    target.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_E2E_PATH"), required=False,
                        help="ComfyUI checkout (main.py)")
    parser.add_argument("--python", default=os.environ.get("COMFYUI_E2E_PYTHON", sys.executable),
                        help="Python with ComfyUI's requirements and the pack's (diffusers, peft)")
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "dmp-comfy-e2e",
                        help="where the full-size random models are kept between runs")
    parser.add_argument("--keep", action="store_true", help="keep the base directory (and its server.log)")
    parser.add_argument("--as-shipped", action="store_true", help="run the workflows at their own sizes")
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="Chromium for the frontend check (skipped without one)")
    parser.add_argument("--dump-core-nodes", action="store_true",
                        help="also refresh tests/comfy_stubs/core_nodes.json from the server")
    args = parser.parse_args(argv)
    if args.comfyui is None or not (args.comfyui / "main.py").is_file():
        parser.error("--comfyui must name a ComfyUI checkout (or set COMFYUI_E2E_PATH)")
    base = Path(tempfile.mkdtemp(prefix="dmp-comfy-e2e-"))
    server = None
    try:
        extra_paths = prepare_base(base, args.cache)
        server = Server(args.comfyui.resolve(), args.python, base, extra_paths, args.port)
        server.wait_ready()
        server.listen()
        if args.dump_core_nodes:
            dump_core_nodes(server, ROOT / "tests" / "comfy_stubs" / "core_nodes.json")
        report = run_checks(server, base, args.as_shipped, args.browser)
        print("\n".join(report))
        print(f"{len(report)} passed, 0 failed")
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
