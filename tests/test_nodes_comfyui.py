"""The pack inside a real ComfyUI checkout (no server): loaded by ComfyUI's own loader, run with
ComfyUI's real model management, interrupt and execution blocker. Skipped unless COMFYUI_PATH
names a checkout; COMFYUI_PYTHON names a Python with ComfyUI's requirements (default: this one).

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/venv/bin/python pytest tests/test_nodes_comfyui.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_stubs.model_files import TINY_BASE, adapter_choice, write_tiny_models
from comfy_stubs.stand_ins import PACK_ROOT
from comfy_stubs.workflow_api import core_node_info

COMFYUI = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
pytestmark = pytest.mark.skipif(not COMFYUI or not (Path(COMFYUI) / "main.py").is_file(),
                                reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

# Runs in ComfyUI's Python: argv[1] = ComfyUI, argv[2] = the pack, argv[3] = a folder with models/,
# argv[4] = JSON names {base, depth, normal, core}.
SCRIPT = r'''
import asyncio, inspect, json, sys
comfyui, pack_root, root, names = sys.argv[1:5]
names = json.loads(names)
sys.argv = [sys.argv[0], "--cpu"]
sys.path.insert(0, comfyui)
import comfy.options
comfy.options.enable_args_parsing()
import folder_paths
folder_paths.add_model_folder_path("diffusers", root + "/models/diffusers")
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
loader, predict = mappings["DMPLoader"](), mappings["DMPPredict"]()
model = loader.load("diffusers/" + names["base"], names["depth"], "auto", adapter_2=names["normal"])[0]
images = torch.rand(2, 24, 40, 3, generator=torch.Generator().manual_seed(0))
settings = dict(steps=2, sampler="ddim", spacing="leading", processing_resolution=0, batch_size=4)
visual, first = predict.predict(model, images, "depth", **settings)
out["visual"] = [list(visual.shape), str(visual.dtype), visual.device.type]
patcher = model.base.patcher
out["patcher"] = type(patcher).__name__
out["managed"] = any(m.model is patcher for m in mm.current_loaded_models)
mm.unload_all_models()
out["unloaded"] = not any(m.model is patcher for m in mm.current_loaded_models)
second = predict.predict(model, images, "depth", **settings)[1]
out["same_after_reload"] = bool(torch.equal(first.raw, second.raw))
mm.interrupt_current_processing(True)
try:
    predict.predict(model, images, "depth", **settings)
    out["interrupted"] = False
except mm.InterruptProcessingException:
    out["interrupted"] = True
out["works_after_interrupt"] = predict.predict(model, images, "normal", **settings)[1].task == "normal"
blocked = mappings["DMPPredictTasks"]().predict(model, images, **settings)[2]
out["blocked"] = [type(blocked).__name__, blocked.message]
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
'''


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui")
    write_tiny_models(root / "models")
    names = json.dumps({"base": TINY_BASE, "depth": adapter_choice("depth"),
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
    assert len(result["dmp_nodes"]) == 9
    assert result["dmp_paths"][0].endswith(os.path.join("models", "dmp")) and len(result["dmp_paths"]) == 2


def test_comfyui_manages_the_model_memory(result):
    assert result["visual"] == [[2, 24, 40, 3], "torch.float32", "cpu"]
    assert result["patcher"] == "ModelPatcher" and result["managed"] and result["unloaded"]
    assert result["same_after_reload"]


def test_comfyui_interrupt_and_blocked_outputs(result):
    assert result["interrupted"] and result["works_after_interrupt"]
    assert result["blocked"][0] == "ExecutionBlocker" and "no segmentation adapter" in result["blocked"][1]


def test_checked_in_core_node_table_matches_comfyui(result):
    for name, table in core_node_info().items():
        real = result["core"][name]
        assert {k: v for k, v in table["input_order"].items() if k != "hidden"} == real["input_order"], name
        assert table["output"] == real["output"], name
        for category in ("required", "optional"):
            for input_name, spec in table["input"].get(category, {}).items():
                kind = spec[0] if isinstance(spec[0], str) else "COMBO"
                assert kind == real["types"][input_name], f"{name}.{input_name}"
