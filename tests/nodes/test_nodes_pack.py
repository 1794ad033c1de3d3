"""The node pack as ComfyUI loads it: import by path, node definitions, model folders, boundaries."""

from __future__ import annotations

import json
import keyword
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_stubs import stand_ins
from comfy_stubs.model_files import ADAPTER_FILE, write_tiny_models

ROOT = stand_ins.PACK_ROOT
NODE_IDS = ("DMPLoadAdapter", "DMPPredict", "DMPPredictTasks", "DMPUncertainty", "DMPDepthToControlNet",
            "DMPDepthColorize", "DMPNormalsToControlNet", "DMPSegmentation", "DMPIntrinsics", "DMPSave", "DMPTo3D")
SOCKET_TYPES = {"DMP_MODEL", "DMP_PREDICTION", "IMAGE", "MASK", "CONDITIONING", "STRING", "MODEL", "VAE", "CLIP"}
# What ComfyUI does not install: the pack must run without them (the engine's library path uses them).
MODEL_LIBRARIES = ("diffusers", "peft", "transformers", "accelerate")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """The pack loaded by path with ComfyUI stand-ins; an extra 'dmp' path registered beforehand,
    as ComfyUI does when extra_model_paths.yaml names one."""
    from dmp_model.sd.tiny import build_tiny_components

    base = tmp_path_factory.mktemp("comfyui")
    write_tiny_models(base / "models", build_tiny_components(seed=0)[0])
    stand_ins.install(base)
    extra = str(base / "elsewhere" / "dmp")
    sys.modules["folder_paths"].folder_names_and_paths["dmp"] = ([extra], set())
    module = stand_ins.load_pack()
    yield module
    stand_ins.unload_pack(module)
    stand_ins.uninstall()


def _import_in_subprocess(code: str, tmp_path: Path) -> dict:
    """Run `code` after importing the pack by path in a fresh interpreter that has no ComfyUI and
    does not have the repository on sys.path; `code` prints one JSON line."""
    script = (
        "import importlib.util, json, sys\n"
        f"root = {str(ROOT)!r}\n"
        "name = root + '-as-ComfyUI-loads-it'\n"
        "spec = importlib.util.spec_from_file_location(name, root + '/__init__.py', "
        "submodule_search_locations=[root])\n"
        "pack = importlib.util.module_from_spec(spec)\n"
        "sys.modules[name] = pack\n"
        "spec.loader.exec_module(pack)\n" + code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_pack_imports_by_path_without_comfyui_and_loads_nothing_heavy(tmp_path):
    result = _import_in_subprocess(
        "mappings = pack.NODE_CLASS_MAPPINGS\n"
        "try:\n"
        "    pack.nodes.comfy_bridge.resolve_adapter('y')\n"
        "    error = None\n"
        "except RuntimeError as err:\n"
        "    error = str(err)\n"
        "print(json.dumps({'nodes': sorted(mappings), 'displays': sorted(pack.NODE_DISPLAY_NAME_MAPPINGS),\n"
        "    'heavy': [m for m in ('diffusers', 'transformers', 'peft', 'dmp_model', 'nodes', 'comfy') "
        "if m in sys.modules],\n"
        "    'adapters': mappings['DMPLoadAdapter'].INPUT_TYPES()['required']['adapter'][0], 'error': error}))\n",
        tmp_path)
    assert result["nodes"] == sorted(NODE_IDS) and result["displays"] == sorted(NODE_IDS)
    assert result["heavy"] == []  # no model library, and nothing under ComfyUI's or a top-level name
    assert result["adapters"] == []
    assert "ComfyUI" in result["error"]


# Runs every node, in a fresh interpreter where the model libraries cannot be imported at all.
_WITHOUT_MODEL_LIBRARIES = """
import importlib.abc, json, sys
BLOCKED = {blocked!r}

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed in ComfyUI's Python")

sys.meta_path.insert(0, Refuse())
sys.path.insert(0, {tests!r})
from pathlib import Path
import torch
from comfy_stubs import core_models, stand_ins
from comfy_stubs.model_files import write_official_adapter
root = Path({root!r})
stand_ins.install(root)
pack = stand_ins.load_pack()
model, vae, clip = core_models.toy_core_objects()
for seed, name in enumerate(("depth-toy-notext", "normal-toy-notext", "segmentation-toy")):
    write_official_adapter(model.model.diffusion_model.unet, root / "models" / "dmp" / name, seed)
nodes = pack.NODE_CLASS_MAPPINGS
dmp_model = None
for name in ("depth-toy-notext", "normal-toy-notext", "segmentation-toy"):
    dmp_model = nodes["DMPLoadAdapter"]().load(model, name + "/pytorch_lora_weights.safetensors", 1.0,
                                               dmp_model=dmp_model)[0]
images = torch.rand(2, 24, 32, 3, generator=torch.Generator().manual_seed(0))
settings = dict(steps=2, sampler="ddim", spacing="leading", processing_resolution=16, batch_size=4)
_visual, depth, *_ = nodes["DMPPredict"]().predict(dmp_model, vae, clip, images, "depth", prompt="a room", **settings)
outputs = nodes["DMPPredictTasks"]().predict(dmp_model, vae, clip, images, **settings, tile=True, tile_size=16,
                                             ensemble="flip")
nodes["DMPUncertainty"]().uncertainty(outputs[1])
nodes["DMPDepthToControlNet"]().convert(depth, "percentile", False, 2.0, 85.0)
nodes["DMPDepthColorize"]().colorize(depth, "Spectral", 2.0, 98.0, False)
nodes["DMPNormalsToControlNet"]().convert(outputs[1], "auto", False, False, False)
nodes["DMPSegmentation"]().convert(outputs[2], "wall", "ade20k")
nodes["DMPSave"]().save(depth, "DMP/%task%", "npy", "millimeters")
print(json.dumps({{"depth": list(depth.raw.shape), "tasks": [o.task for o in outputs[:3]],
                   "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}}))
"""


def test_every_node_runs_without_diffusers_peft_or_transformers(tmp_path):
    """ComfyUI's Python has none of them: the pack must not import them, directly or through dmp_model."""
    script = _WITHOUT_MODEL_LIBRARIES.format(blocked=MODEL_LIBRARIES, tests=str(ROOT / "tests" / "support"),
                                             root=str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"depth": [2, 24, 32], "tasks": ["depth", "normal", "segmentation"], "loaded": []}


def test_the_import_blocker_would_catch_a_model_library(tmp_path):
    script = _WITHOUT_MODEL_LIBRARIES.split("from pathlib")[0].format(blocked=MODEL_LIBRARIES, tests="") + \
        "import diffusers\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "diffusers is not installed" in done.stderr


def test_pack_module_name_is_not_an_identifier(pack):
    assert not pack.__name__.isidentifier() and not keyword.iskeyword(pack.__name__)
    assert pack.nodes.__name__ == pack.__name__ + ".nodes"
    assert sorted(pack.NODE_CLASS_MAPPINGS) == sorted(NODE_IDS)


def test_only_the_bridge_imports_comfyui_and_imports_are_relative():
    comfy_modules = "folder_paths|comfy|comfy_execution|server|nodes"
    comfy_import = re.compile(rf"^\s*(import|from)\s+({comfy_modules})\b", re.M)
    absolute_pack = re.compile(r"^\s*(import|from)\s+(dmp_model|nodes)\b", re.M)
    for file in sorted((ROOT / "nodes").glob("*.py")) + [ROOT / "__init__.py"]:
        text = file.read_text(encoding="utf-8")
        if file.name != "comfy_bridge.py":
            assert not comfy_import.search(text), f"{file.name} imports ComfyUI directly"
        assert not absolute_pack.search(text), f"{file.name} imports the pack absolutely"
    # dmp_model's side (no ComfyUI, only relative imports of itself): test_boundaries.py


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_definition_is_well_formed(pack, node_id):
    node = pack.NODE_CLASS_MAPPINGS[node_id]
    assert node_id.startswith("DMP") and pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert node.CATEGORY.split("/")[0] == "DMP"
    assert isinstance(node.DESCRIPTION, str) and len(node.DESCRIPTION) > 40
    assert callable(getattr(node, node.FUNCTION))
    inputs = node.INPUT_TYPES()
    assert set(inputs) <= {"required", "optional", "hidden"} and "required" in inputs
    for category in ("required", "optional"):
        for name, spec in inputs.get(category, {}).items():
            kind, options = spec
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            if isinstance(kind, list):
                assert kind and all(isinstance(c, str) for c in kind), f"{node_id}.{name}"
                assert options.get("default", kind[0]) in kind
            else:
                assert kind in SOCKET_TYPES | WIDGET_TYPES, f"{node_id}.{name}: {kind}"
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"]
                assert isinstance(options["default"], int if kind == "INT" else float)
            if kind == "BOOLEAN":
                assert isinstance(options["default"], bool)
    returns = node.RETURN_TYPES
    assert isinstance(returns, tuple) and all(isinstance(t, str) for t in returns)
    assert len(getattr(node, "RETURN_NAMES", returns)) == len(returns)
    assert len(node.OUTPUT_TOOLTIPS) == len(returns) and all(node.OUTPUT_TOOLTIPS)
    assert getattr(node, "OUTPUT_NODE", False) == (node_id in ("DMPSave", "DMPTo3D"))  # they write files


def test_function_arguments_match_inputs(pack):
    """ComfyUI calls FUNCTION with the inputs as keywords: every input must be accepted."""
    import inspect

    for node in pack.NODE_CLASS_MAPPINGS.values():
        parameters = inspect.signature(getattr(node, node.FUNCTION)).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        inputs = node.INPUT_TYPES()
        for name in inputs["required"]:
            assert name in parameters, f"{node.__name__}.{node.FUNCTION} lacks {name}"
        for name in inputs.get("optional", {}):
            has_default = name in parameters and parameters[name].default is not inspect.Parameter.empty
            assert takes_any or has_default, f"{node.__name__}: optional {name} needs a default"


def test_dmp_folder_registered_keeping_extra_model_paths(pack):
    import folder_paths

    paths, extensions = folder_paths.folder_names_and_paths["dmp"]
    assert paths[0] == os.path.join(folder_paths.models_dir, "dmp")
    assert paths[1].endswith(os.path.join("elsewhere", "dmp"))
    assert extensions == folder_paths.supported_pt_extensions


def test_adapter_dropdown_lists_models_dmp_then_models_loras(pack):
    adapters = pack.NODE_CLASS_MAPPINGS["DMPLoadAdapter"].INPUT_TYPES()["required"]["adapter"][0]
    relative = [name.replace(os.sep, "/") for name in adapters]
    assert f"depth-hypersim-notext/{ADAPTER_FILE}" in relative and f"depth-other-base/{ADAPTER_FILE}" in relative
    assert relative.index(f"depth-hypersim-notext/{ADAPTER_FILE}") < relative.index("sdxl_detail_lora.safetensors")
    assert not any(name.endswith(("optimizer.bin", "state.pt")) for name in relative)


def test_requirements_leave_out_what_comfyui_does_not_have():
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").lower().splitlines()
    names = {re.split(r"[<>=!~\[; ]", line.strip())[0] for line in lines if line.strip() and not line.startswith("#")}
    assert names and not names & set(MODEL_LIBRARIES)


@pytest.mark.parametrize("node_id", ["DMPPredict", "DMPPredictTasks"])
def test_every_steps_value_offered_runs_with_every_spacing(pack, node_id):
    required = pack.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"]
    steps = required["steps"][1]
    for spacing in required["spacing"][0]:
        for value in (steps["min"], steps["default"], steps["max"]):
            pack.dmp_model.PredictOptions(steps=value, spacing=spacing)  # raises on a value it refuses


# The tuning widgets most users never touch: folded away by newer frontends ("advanced"), still in place.
ADVANCED_WIDGETS = {"sampler", "spacing", "batch_size", "temporal_alignment", "guidance_scale", "tile_size",
                    "tile_overlap"}


@pytest.mark.parametrize("node_id", ["DMPPredict", "DMPPredictTasks"])
def test_tuning_widgets_are_advanced_and_the_others_are_not(pack, node_id):
    inputs = pack.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    flagged = {name for group in inputs.values() for name, spec in group.items()
               if len(spec) > 1 and spec[1].get("advanced") is True}
    assert flagged == ADVANCED_WIDGETS


def test_the_pack_is_ready_for_the_comfy_registry():
    """What `comfy node validate` and the Registry read: a three-part requires-comfyui, an icon, the
    repository; `comfy node pack` leaves out tests and benchmarks (.comfyignore)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    comfy = project["tool"]["comfy"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])  # comfy-cli drops anything else
    assert comfy["PublisherId"] and comfy["Icon"].startswith("https://") and comfy["Icon"].endswith(".svg")
    assert (ROOT / "docs" / Path(comfy["Icon"]).name).is_file()  # the icon the URL serves is in the repository
    assert project["project"]["urls"]["Repository"].startswith("https://github.com/")
    ignored = {line.strip() for line in (ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()}
    assert {"tests/", "benchmarks/"} <= ignored
