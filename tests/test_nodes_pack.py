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
from comfy_stubs.model_files import ADAPTER_FILE, TINY_BASE, write_tiny_models

ROOT = stand_ins.PACK_ROOT
NODE_IDS = ("DMPLoader", "DMPPredict", "DMPPredictTasks", "DMPDepthToControlNet", "DMPDepthColorize",
            "DMPNormalsToControlNet", "DMPSegmentation", "DMPIntrinsics", "DMPSave")
SOCKET_TYPES = {"DMP_MODEL", "DMP_PREDICTION", "IMAGE", "MASK", "CONDITIONING", "STRING"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """The pack loaded by path with ComfyUI stand-ins; an extra 'dmp' path registered beforehand,
    as ComfyUI does when extra_model_paths.yaml names one."""
    base = tmp_path_factory.mktemp("comfyui")
    write_tiny_models(base / "models")
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
        "    mappings['DMPLoader']().load('x', 'y', 'auto')\n"
        "    error = None\n"
        "except RuntimeError as err:\n"
        "    error = str(err)\n"
        "print(json.dumps({'nodes': sorted(mappings), 'displays': sorted(pack.NODE_DISPLAY_NAME_MAPPINGS),\n"
        "    'heavy': [m for m in ('diffusers', 'transformers', 'peft', 'dmp_model', 'nodes', 'comfy') "
        "if m in sys.modules],\n"
        "    'bases': mappings['DMPLoader'].INPUT_TYPES()['required']['base'][0], 'error': error}))\n",
        tmp_path)
    assert result["nodes"] == sorted(NODE_IDS) and result["displays"] == sorted(NODE_IDS)
    assert result["heavy"] == []  # no model library, and nothing under ComfyUI's or a top-level name
    assert result["bases"] == []
    assert "ComfyUI" in result["error"]


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
    for file in sorted((ROOT / "dmp_model").rglob("*.py")):
        text = file.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from)\s+(comfy|folder_paths)\b", text, re.M), file.name
        assert not re.search(r"^\s*(import|from)\s+dmp_model\b", text, re.M), \
            f"{file.name} imports dmp_model absolutely: it breaks when ComfyUI loads the pack by path"


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
    assert getattr(node, "OUTPUT_NODE", False) == (node_id == "DMPSave")


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


def test_adapter_and_base_dropdowns(pack):
    loader = pack.NODE_CLASS_MAPPINGS["DMPLoader"].INPUT_TYPES()
    adapters = loader["required"]["adapter"][0]
    assert f"depth-hypersim-notext/{ADAPTER_FILE}".replace("/", os.sep) in adapters
    assert f"depth-other-base/{ADAPTER_FILE}".replace("/", os.sep) in adapters
    assert not any(name.endswith("optimizer.bin") for name in adapters)
    assert loader["optional"]["adapter_2"][0] == ["none", *adapters]
    assert loader["required"]["base"][0] == ["sdxl_base_1.0.safetensors", f"diffusers/{TINY_BASE}"]


def test_diffusers_folders_are_found_once_through_link_cycles(pack, tmp_path, monkeypatch):
    import folder_paths

    root = tmp_path / "diffusers"
    for model in ("a/sd15", "b/sd14"):
        (root / model / "unet").mkdir(parents=True)
        (root / model / "model_index.json").write_text("{}")
    (root / "a" / "sd15" / "unet" / "model_index.json").write_text("{}")  # inside a model: not a model
    (root / "b" / "loop").symlink_to(root, target_is_directory=True)  # a cycle back to the top
    (root / "c").symlink_to(root / "b" / "sd14", target_is_directory=True)  # a second name: listed once
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(root)], ["folder"]))
    bridge = pack.nodes.comfy_bridge
    # Without the checks also a/sd15/unet, c, b/loop/a/sd15, b/loop/b/loop/a/sd15, ... until ELOOP.
    assert bridge._diffusers_folders() == {"a/sd15": root / "a" / "sd15", "b/sd14": root / "b" / "sd14"}
    assert bridge.base_choices()[-2:] == ["diffusers/a/sd15", "diffusers/b/sd14"]
    assert bridge.resolve_base("diffusers/b/sd14") == root / "b" / "sd14"


@pytest.mark.parametrize("node_id", ["DMPPredict", "DMPPredictTasks"])
def test_every_steps_value_offered_runs_with_every_spacing(pack, node_id):
    required = pack.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"]
    steps = required["steps"][1]
    for spacing in required["spacing"][0]:
        for value in (steps["min"], steps["default"], steps["max"]):
            pack.dmp_model.PredictOptions(steps=value, spacing=spacing)  # raises on a value it refuses
