"""The pack inside a real ComfyUI checkout (no server): loaded by ComfyUI's own loader, DMP on the
MODEL/VAE/CLIP of core's Load Checkpoint (a random-weight SD 1.5), ComfyUI's real LoRA patching,
model management, interrupt and execution blocker. Skipped unless COMFYUI_PATH names a checkout;
COMFYUI_PYTHON names a Python with ComfyUI's requirements (default: this one).

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/venv/bin/python pytest tests/nodes/test_nodes_comfyui.py
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_stubs.model_files import adapter_choice
from comfy_stubs.stand_ins import PACK_ROOT
from comfy_stubs.workflow_api import core_node_info

COMFYUI = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
pytestmark = pytest.mark.skipif(not COMFYUI or not (Path(COMFYUI) / "main.py").is_file(),
                                reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

# Runs in ComfyUI's Python: argv[1] = ComfyUI, argv[2] = the pack, argv[3] = a folder with models/,
# argv[4] = JSON names {checkpoint, depth, normal, core}.
SCRIPT = r"""
import asyncio, inspect, json, sys
comfyui, pack_root, root, names = sys.argv[1:5]
names = json.loads(names)
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, comfyui)
import comfy.options
comfy.options.enable_args_parsing()
import folder_paths
folder_paths.add_model_folder_path("checkpoints", root + "/models/checkpoints")
folder_paths.add_model_folder_path("dmp", root + "/models/dmp")  # as extra_model_paths.yaml does
folder_paths.set_output_directory(root + "/output")
folder_paths.set_temp_directory(root + "/temp")
import torch
import nodes
import comfy.model_management as mm

def run(coroutine_or_value):
    return asyncio.run(coroutine_or_value) if inspect.iscoroutine(coroutine_or_value) else coroutine_or_value

run(nodes.init_extra_nodes(init_custom_nodes=False))
assert run(nodes.load_custom_node(pack_root)) is not False
out = {"device": str(mm.get_torch_device())}
mappings = nodes.NODE_CLASS_MAPPINGS
out["dmp_nodes"] = sorted(k for k in mappings if k.startswith("DMP"))
out["dmp_paths"] = folder_paths.get_folder_paths("dmp")
model, clip, vae = mappings["CheckpointLoaderSimple"]().load_checkpoint(names["checkpoint"])[:3]
out["offered"] = [a for a in mappings["DMPLoadAdapter"].INPUT_TYPES()["required"]["adapter"][0]]
loader, predict = mappings["DMPLoadAdapter"](), mappings["DMPPredict"]()
dmp_model = loader.load(model, names["depth"], 1.0)[0]
dmp_model = loader.load(model, names["normal"], 1.0, dmp_model=dmp_model)[0]
out["patched"] = [len(a.model.patches) for a in dmp_model.adapters]
out["shares_base"] = all(a.model.model is model.model for a in dmp_model.adapters) and not model.patches
images = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(0))
settings = dict(steps=2, sampler="ddim", spacing="leading", processing_resolution=64, batch_size=4)
with torch.inference_mode():
    visual, first, no_uncertainty, _ = predict.predict(dmp_model, vae, clip, images, "depth", **settings)
out["no_uncertainty"] = type(no_uncertainty).__name__
with torch.inference_mode():  # tiles of 32 px over 48 x 64 and a flip ensemble
    flipped = predict.predict(dmp_model, vae, clip, images, "depth", **{**settings, "processing_resolution": 32},
                              tile=True, ensemble="flip")
out["flip_outputs"] = [[type(o).__name__, list(getattr(o, "shape", ()))] for o in flipped[::2] + flipped[3:]]
out["flip_uncertainty"] = list(flipped[1].uncertainty.shape)
out["visual"] = [list(visual.shape), str(visual.dtype), visual.device.type]
adapter = dmp_model.adapters[0].model
out["managed"] = any(m.model is adapter for m in mm.current_loaded_models)
mm.unload_all_models()
out["unloaded"] = not any(m.model is adapter for m in mm.current_loaded_models)
with torch.inference_mode():
    normal = predict.predict(dmp_model, vae, clip, images, "normal", **settings)[1]
    second = predict.predict(dmp_model, vae, clip, images, "depth", **settings)[1]
# Bit for bit by construction: the same patches (W + strength * up @ down, computed again from the backed-up
# W by the same float32 operations) and the same call on the same images, in one process.
out["same_after_reload_and_switch"] = bool(torch.equal(first.raw, second.raw))
out["reload_max_diff"] = float((first.raw - second.raw).abs().max())
out["normal_differs"] = normal.task == "normal"
mm.interrupt_current_processing(True)
try:
    with torch.inference_mode():
        predict.predict(dmp_model, vae, clip, images, "depth", **settings)
    out["interrupted"] = False
except mm.InterruptProcessingException:
    out["interrupted"] = True
with torch.inference_mode():
    after = predict.predict(dmp_model, vae, clip, images, "normal", **settings)[1]
    out["works_after_interrupt"] = after.task == "normal"
    blocked = mappings["DMPPredictTasks"]().predict(dmp_model, vae, clip, images, **settings)[2]
out["blocked"] = [type(blocked).__name__, blocked.message]
# Core's UNet writes into the transformer_options it gets; DMP passes its own, so the defaults stay empty.
unet_class = type(model.model.diffusion_model)
out["default_options"] = [repr(inspect.signature(getattr(unet_class, f)).parameters["transformer_options"].default)
                          for f in ("forward", "_forward") if hasattr(unet_class, f)]
out["get_models"] = all(m is a.model for m, a in zip(dmp_model.get_models(), dmp_model.adapters))
# A style LoRA chained before Load DMP Adapter (core's own LoRA loading): DMP warns that it changes predictions.
import logging, comfy.sd, comfy.utils
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger().addHandler(handler)
style = comfy.utils.load_torch_file(folder_paths.get_full_path("dmp", names["normal"]), safe_load=True)
chained = comfy.sd.load_lora_for_models(model, clip, style, 0.5, 0.0)[0]
loader.load(chained, names["depth"], 1.0)
logging.getLogger().removeHandler(handler)
out["chained_warning"] = [r.getMessage() for r in records if "weight patches" in r.getMessage()]
core = {}
for name in names["core"]:
    cls = mappings[name]
    inputs = cls.INPUT_TYPES()
    core[name] = {"input_order": {k: list(v) for k, v in inputs.items() if k != "hidden"},
                  "output": list(cls.RETURN_TYPES),
                  "types": {n: (s[0] if isinstance(s[0], str) else "COMBO")
                            for k, v in inputs.items() if k != "hidden" for n, s in v.items()}}
out["core"] = core
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from comfy_e2e import CHECKPOINT, make_full_size_models  # a random-weight SD 1.5, made once (~3 GB)

    root = tmp_path_factory.mktemp("comfyui")
    cache = make_full_size_models(Path.home() / ".cache" / "dmp-comfy-e2e")
    (root / "models").mkdir()
    for folder in ("checkpoints", "dmp"):
        (root / "models" / folder).symlink_to(cache / folder, target_is_directory=True)
    names = json.dumps({"checkpoint": CHECKPOINT, "depth": adapter_choice("depth"),
                        "normal": adapter_choice("normal"), "core": sorted(core_node_info())})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([PYTHON, "-c", SCRIPT, COMFYUI, str(PACK_ROOT), str(root), names], cwd=COMFYUI,
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode and "ModuleNotFoundError" in done.stderr:
        missing = done.stderr.strip().splitlines()[-1]
        pytest.skip(f"{PYTHON} lacks ComfyUI's requirements (set COMFYUI_PYTHON): {missing}")
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_comfyui_loads_the_pack_and_its_folders(result):
    assert result["device"] == "cpu"  # --cpu
    # Every node the pack declares (the keys of its NODE_CLASS_MAPPINGS, read from the source) is registered.
    source = ast.parse((PACK_ROOT / "nodes" / "__init__.py").read_text(encoding="utf-8"))
    mapping = next(node.value for node in source.body if isinstance(node, ast.Assign)
                   and node.targets[0].id == "NODE_CLASS_MAPPINGS")
    assert result["dmp_nodes"] == sorted(key.value for key in mapping.keys)
    assert result["dmp_paths"][0].endswith(os.path.join("models", "dmp")) and len(result["dmp_paths"]) == 2
    assert adapter_choice("depth") in [name.replace(os.sep, "/") for name in result["offered"]]


def test_adapters_patch_core_models_and_comfyui_manages_their_memory(result):
    assert result["patched"] == [128, 128] and result["shares_base"]  # every official LoRA module patches
    assert result["visual"] == [[2, 48, 64, 3], "torch.float32", "cpu"]
    assert result["managed"] and result["unloaded"]
    assert result["same_after_reload_and_switch"], result["reload_max_diff"]  # see SCRIPT: exact by construction
    assert result["normal_differs"]


def test_the_unets_default_options_stay_untouched_and_core_sees_the_clones(result):
    assert result["default_options"] and set(result["default_options"]) == {"{}"}
    assert result["get_models"]


def test_a_lora_chained_before_the_adapter_is_warned_about_in_comfyui(result):
    (message,) = result["chained_warning"]
    assert "weight patches on 128 weights" in message and "checkpoint loader's MODEL" in message


def test_comfyui_interrupt_and_blocked_outputs(result):
    assert result["interrupted"] and result["works_after_interrupt"]
    assert result["blocked"][0] == "ExecutionBlocker" and "no segmentation adapter" in result["blocked"][1]


def test_tiles_and_flip_ensembles_give_uncertainty_outputs_in_comfyui(result):
    assert result["no_uncertainty"] == "ExecutionBlocker"  # without an ensemble: blocked, with a reason
    assert result["flip_outputs"] == [["Tensor", [2, 48, 64, 3]], ["Tensor", [2, 48, 64, 3]], ["Tensor", [2, 48, 64]]]
    assert result["flip_uncertainty"] == [2, 48, 64]


def test_checked_in_core_node_table_matches_comfyui(result):
    for name, table in core_node_info().items():
        real = result["core"][name]
        assert {k: v for k, v in table["input_order"].items() if k != "hidden"} == real["input_order"], name
        assert table["output"] == real["output"], name
        for category in ("required", "optional"):
            for input_name, spec in table["input"].get(category, {}).items():
                kind = spec[0] if isinstance(spec[0], str) else "COMBO"
                assert kind == real["types"][input_name], f"{name}.{input_name}"
