"""The example workflows: UI format that converts to ComfyUI's API format with valid values and links."""

from __future__ import annotations

import copy
import json
import sys

import pytest

from comfy_stubs import stand_ins
from comfy_stubs.model_files import ADAPTER_FILE, ADAPTERS
from comfy_stubs.workflow_api import CORE_SNAPSHOTS, FRONTEND_ONLY, core_node_info, object_info_of, to_api, validate

WORKFLOWS = sorted((stand_ins.PACK_ROOT / "example_workflows").glob("*.json"))
# The models the workflows name, as a user has them; ComfyUI ships input/example.png.
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
CONTROLNET = "control_v11f1p_sd15_depth_fp16.safetensors"


@pytest.fixture(scope="module")
def pack_setup(tmp_path_factory):
    """(node info of the pack's nodes, files by folder, the pack) with the workflows' model files in
    place (empty files: only their names matter here)."""
    root = tmp_path_factory.mktemp("comfyui")
    for relative in [f"checkpoints/{CHECKPOINT}", f"controlnet/{CONTROLNET}",
                     *(f"dmp/{name}/{ADAPTER_FILE}" for name in ADAPTERS.values())]:
        (root / "models" / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / "models" / relative).touch()
    stand_ins.install(root)
    pack = stand_ins.load_pack()
    info = {k: object_info_of(v) for k, v in pack.NODE_CLASS_MAPPINGS.items()}
    folder_paths = sys.modules["folder_paths"]
    files = {"checkpoints": folder_paths.get_filename_list("checkpoints"),
             "controlnet": folder_paths.get_filename_list("controlnet"), "input": ["example.png", "example.mp4"]}
    yield info, files, pack
    stand_ins.unload_pack(pack)
    stand_ins.uninstall()


@pytest.fixture(scope="module", params=CORE_SNAPSHOTS)
def setup(request, pack_setup):
    """(node info of the pack's nodes and of ComfyUI's core nodes, files by folder, the pack): once
    with each core's schemas (core_nodes/: 0.3.64 as dumped, the newest as read from its sources)."""
    pack_info, files, pack = pack_setup
    return {**core_node_info(request.param), **pack_info}, files, pack


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_there_are_the_workflows_of_the_issues():
    assert [p.name for p in WORKFLOWS] == ["1_depth_normals_to_controlnet.json",
                                          "2_sd15_depth_controlnet_regeneration.json",
                                          "3_all_five_tasks.json", "4_segmentation_mask_inpainting.json",
                                          "5_video_depth_to_controlnet.json", "6_image_to_relightable_3d.json"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_valid(setup, path):
    info, files, _pack = setup
    workflow = _load(path)
    assert workflow["version"] == 0.4 and workflow["last_node_id"] >= max(n["id"] for n in workflow["nodes"])
    assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"])
    assert validate(workflow, info, files) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_converts_to_the_api_format(setup, path):
    info, _files, pack = setup
    workflow = _load(path)
    prompt = to_api(workflow, info)
    sent = [n for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY]
    assert sorted(prompt, key=int) == sorted((str(n["id"]) for n in sent), key=int)
    for entry in prompt.values():
        assert entry["class_type"] in info, entry["class_type"]
        for name, value in entry["inputs"].items():
            if isinstance(value, list):
                assert value[0] in prompt, f"{entry['class_type']}.{name} links to a node not sent"
    assert any(info[e["class_type"]].get("output_node") or e["class_type"] in ("DMPSave", "PreviewImage")
               for e in prompt.values())


def test_every_pack_node_is_shown_in_an_example(setup):
    _info, _files, pack = setup
    used = {node["type"] for path in WORKFLOWS for node in _load(path)["nodes"]}
    assert set(pack.NODE_CLASS_MAPPINGS) <= used


def test_the_issue_layouts(setup):
    info, _files, _pack = setup
    kinds = [{e["class_type"] for e in to_api(_load(p), info).values()} for p in WORKFLOWS]
    assert {"LoadImage", "DMPDepthToControlNet", "DMPNormalsToControlNet", "DMPSave"} <= kinds[0]
    assert {"KSampler", "DMPPredict", "ControlNetApplyAdvanced", "ControlNetLoader"} <= kinds[1]
    assert {"DMPPredictTasks", "DMPIntrinsics", "DMPSegmentation", "DMPDepthColorize"} <= kinds[2]
    assert {"DMPSegmentation", "SetLatentNoiseMask", "KSampler"} <= kinds[3]
    assert {"LoadVideo", "GetVideoComponents", "DMPPredict", "DMPDepthToControlNet", "CreateVideo",
            "SaveVideo"} <= kinds[4]
    assert {"LoadImage", "DMPPredictTasks", "DMPTo3D", "Preview3D"} <= kinds[5]
    asset = to_api(_load(WORKFLOWS[5]), info)
    (to3d,) = [k for k, e in asset.items() if e["class_type"] == "DMPTo3D"]
    assert {name: asset[to3d]["inputs"][name][1] for name in ("depth", "normal", "albedo")} == {
        "depth": 0, "normal": 1, "albedo": 3}  # DMP Predict Tasks' outputs of those tasks
    assert all(e["inputs"]["model_file"] == [to3d, 0] for e in asset.values() if e["class_type"] == "Preview3D")
    video = to_api(_load(WORKFLOWS[4]), info)
    predict = next(e["inputs"] for e in video.values() if e["class_type"] == "DMPPredict")
    assert predict["batch_kind"] == "video" and predict["temporal_alignment"] == 1.0
    fps = [e["inputs"]["fps"] for e in video.values() if e["class_type"] == "CreateVideo"]
    assert fps and all(video[f[0]]["class_type"] == "GetVideoComponents" for f in fps)  # the clip's own rate
    adapters = [e for e in to_api(_load(WORKFLOWS[2]), info).values() if e["class_type"] == "DMPLoadAdapter"]
    assert len({e["inputs"]["adapter"] for e in adapters}) == 5


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_one_checkpoint_loader_feeds_dmp_and_everything_else(setup, path):
    """DMP runs on core's MODEL, VAE and CLIP: the base is loaded once, by core's loader."""
    info, _files, _pack = setup
    prompt = to_api(_load(path), info)
    (loader,) = [k for k, e in prompt.items() if e["class_type"] == "CheckpointLoaderSimple"]
    for entry in prompt.values():
        for name, value in entry["inputs"].items():
            if name in ("model", "vae", "clip") and isinstance(value, list):
                assert value[0] == loader, f"{entry['class_type']}.{name} is not fed by the checkpoint loader"
    for entry in prompt.values():
        if entry["class_type"] in ("DMPPredict", "DMPPredictTasks"):
            assert {entry["inputs"]["vae"][0], entry["inputs"]["clip"][0]} == {loader}


def test_workflow_1_keeps_the_default_settings_and_saves_raw_depth_as_npy(setup):
    info, _files, pack = setup
    prompt = to_api(_load(WORKFLOWS[0]), info)
    defaults = pack.dmp_model.PredictOptions()
    for entry in (e for e in prompt.values() if e["class_type"] == "DMPPredict"):
        inputs = entry["inputs"]
        assert (inputs["steps"], inputs["sampler"], inputs["spacing"], inputs["processing_resolution"]) == (
            defaults.steps, defaults.sampler, defaults.spacing, defaults.processing_resolution)
    saves = [e["inputs"] for e in prompt.values() if e["class_type"] == "DMPSave"]
    assert {s["format"] for s in saves} == {"png", "npy"}
    assert all(prompt[s["prediction"][0]]["inputs"]["task"] == "depth" for s in saves)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_loaders_offer_the_public_models_for_download(path):
    for node in _load(path)["nodes"]:
        if node["type"] in ("CheckpointLoaderSimple", "ControlNetLoader"):
            (model,) = node["properties"]["models"]
            assert model["name"] == node["widgets_values"][0]
            assert model["url"].startswith("https://huggingface.co/") and model["name"] in model["url"]
            assert model["directory"] == {"CheckpointLoaderSimple": "checkpoints",
                                          "ControlNetLoader": "controlnet"}[node["type"]]
        if node["type"] == "Note":
            assert "github.com/shinying/dmp" in node["widgets_values"][0]  # where the adapters come from


# The converter itself ----------------------------------------------------------------------------

def test_converter_follows_the_frontends_widget_conventions(setup):
    info, files, _pack = setup
    workflow = _load(WORKFLOWS[1])
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    assert sampler["widgets_values"][1] == "fixed"  # the seed's control value
    entry = to_api(workflow, info)[str(sampler["id"])]["inputs"]
    assert entry["seed"] == 42 and entry["steps"] == 20 and entry["sampler_name"] == "euler"
    image = next(n for n in _load(WORKFLOWS[0])["nodes"] if n["type"] == "LoadImage")
    assert image["widgets_values"] == ["example.png", "image"]  # the upload button's value
    assert to_api(_load(WORKFLOWS[0]), info)[str(image["id"])]["inputs"] == {"image": "example.png"}


def test_converter_and_validator_catch_broken_workflows(setup):
    info, files, _pack = setup
    base = _load(WORKFLOWS[0])
    predict = next(i for i, n in enumerate(base["nodes"]) if n["type"] == "DMPPredict")

    short = copy.deepcopy(base)  # a required widget's value missing: the values no longer line up
    del short["nodes"][predict]["widgets_values"][4:]
    with pytest.raises(ValueError, match="no widget value for 'processing_resolution'"):
        to_api(short, info)

    bad_value = copy.deepcopy(base)
    bad_value["nodes"][predict]["widgets_values"][2] = "euler"  # sampler
    assert any("'euler' is not one of ['ddim', 'oracle']" in p for p in validate(bad_value, info, files))

    too_many = copy.deepcopy(base)
    too_many["nodes"][predict]["widgets_values"][1] = 5000  # steps
    assert any("outside [1, 999]" in p for p in validate(too_many, info, files))

    mistyped = copy.deepcopy(base)
    mistyped["links"][0][5] = "MASK"
    assert any("is not MASK" in p for p in validate(mistyped, info, files))

    unknown = copy.deepcopy(base)
    unknown["nodes"][predict]["type"] = "DMPMissing"
    node_id = base["nodes"][predict]["id"]
    assert validate(unknown, info, files) == [f"node {node_id}: unknown node type 'DMPMissing'"]
