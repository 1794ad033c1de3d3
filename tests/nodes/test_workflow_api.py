"""The UI -> API workflow converter on small hand-made workflows: DynamicCombo widgets, optional
widgets that older saves lack, widgets_values_named, upload buttons and MultiType inputs.

The expectations follow what ComfyUI's frontend (comfyui-frontend-package 1.58.1) sends for the
same saves, checked in Chromium by tests/comfy_e2e.py; the schemas are the checked-in snapshots."""

from __future__ import annotations

import re

import pytest

from comfy_stubs.workflow_api import (
    CORE_SNAPSHOTS,
    INSTALLED_CORE,
    core_node_info,
    core_snapshot_source,
    to_api,
    validate,
)

NEWEST, OLD = core_node_info("newest"), core_node_info("0.3.64")
# A node that makes what the nodes under test take (its outputs: a video, a GLB file, an image).
SOURCE = {"Source": {"input": {"required": {}}, "input_order": {"required": []},
                     "output": ["VIDEO", "FILE_3D_GLB", "IMAGE"], "output_name": ["video", "glb", "image"]}}
NO_EDIT = {"trim": {"start_time": 0.0, "duration": 0.0}, "crop": {"x": 0, "y": 0, "width": 0, "height": 0}}


def _workflow(kind: str, widgets_values=None, named=None, link: tuple[str, int] | None = None) -> dict:
    """Node 2 of type `kind` with these saved values, its input `link[0]` fed by Source's output `link[1]`."""
    node = {"id": 2, "type": kind, "inputs": [], "outputs": []}
    if widgets_values is not None:
        node["widgets_values"] = widgets_values
    if named is not None:
        node["widgets_values_named"] = named
    source = {"id": 1, "type": "Source", "inputs": [], "outputs": [{"links": []} for _ in range(3)]}
    links = []
    if link is not None:
        name, slot = link
        links.append([1, 1, slot, 2, 0, SOURCE["Source"]["output"][slot]])
        source["outputs"][slot]["links"] = [1]
        node["inputs"] = [{"name": name, "link": 1}]
    return {"nodes": [source, node], "links": links}


def _inputs(workflow: dict, info: dict) -> dict:
    return to_api(workflow, {**info, **SOURCE})["2"]["inputs"]


def _problems(workflow: dict, info: dict) -> list[str]:
    return validate(workflow, {**info, **SOURCE}, files={"input": ["clip.mp4"]})


SAVE_VIDEO_H264 = ["video/x", "mp4", "h264", "re-encode", 20.0, "auto"]
SAVE_VIDEO_H264_INPUTS = {"filename_prefix": "video/x", "format": "mp4", "format.codec": "h264",
                          "format.codec.encoding": "re-encode", "format.codec.encoding.crf": 20.0, "codec": "auto",
                          "video": ["1", 0]}


def test_a_dynamic_combo_is_followed_by_the_widgets_of_its_chosen_option_under_dotted_keys():
    workflow = _workflow("SaveVideo", SAVE_VIDEO_H264, link=("video", 0))
    assert _inputs(workflow, NEWEST) == SAVE_VIDEO_H264_INPUTS
    assert _problems(workflow, NEWEST) == []
    # Another option, other widgets: av1's encoding is 'auto', which has no crf after it.
    auto = _workflow("SaveVideo", ["video/x", "webm", "av1", "auto", "auto"], link=("video", 0))
    assert _inputs(auto, NEWEST) == {"filename_prefix": "video/x", "format": "webm", "format.codec": "av1",
                                     "format.codec.encoding": "auto", "codec": "auto", "video": ["1", 0]}


def test_dynamic_combo_choices_and_the_values_under_them_are_validated():
    bad_format = _workflow("SaveVideo", ["video/x", "avi", "auto", "auto"], link=("video", 0))
    assert _problems(bad_format, NEWEST) == [
        "node 2 (SaveVideo): format: 'avi' is not one of ['auto', 'mp4', 'mkv', 'webm']"]
    webm_h264 = _workflow("SaveVideo", ["video/x", "webm", "h264", "auto"], link=("video", 0))
    assert _problems(webm_h264, NEWEST) == [
        "node 2 (SaveVideo): format.codec: 'h264' is not one of ['auto', 'av1']"]
    high_crf = _workflow("SaveVideo", ["video/x", "mp4", "h264", "re-encode", 80.0, "auto"], link=("video", 0))
    assert _problems(high_crf, NEWEST) == [
        "node 2 (SaveVideo): format.codec.encoding.crf: 80.0 is outside [0.0, 51.0]"]


def test_older_saves_take_the_defaults_of_trailing_optional_widgets():
    create = _workflow("CreateVideo", [24.0], link=("images", 2))
    assert _inputs(create, NEWEST) == {"fps": 24.0, "bit_depth": "auto", "color_space": "sRGB", "codec": "none",
                                       "images": ["1", 2]}
    assert _inputs(create, OLD) == {"fps": 24.0, "images": ["1", 2]}
    # 0.3.64's SaveVideo [prefix, format, codec]: on the newest core the codec lands in format.codec,
    # and the hidden legacy codec (a DynamicCombo without a declared default) takes its first option.
    save = _workflow("SaveVideo", ["video/x", "auto", "auto"], link=("video", 0))
    assert _inputs(save, OLD) == {"filename_prefix": "video/x", "format": "auto", "codec": "auto", "video": ["1", 0]}
    assert _inputs(save, NEWEST) == {"filename_prefix": "video/x", "format": "auto", "format.codec": "auto",
                                     "codec": "auto", "video": ["1", 0]}
    assert _problems(create, NEWEST) == _problems(save, NEWEST) == []


def test_values_must_still_line_up():
    with pytest.raises(ValueError, match="no widget value for 'format'"):
        _inputs(_workflow("SaveVideo", ["video/x"], link=("video", 0)), NEWEST)
    with pytest.raises(ValueError, match="no widget value for 'format.codec'"):  # required inside the option
        _inputs(_workflow("SaveVideo", ["video/x", "mp4"], link=("video", 0)), NEWEST)
    with pytest.raises(ValueError, match=r"1 widget values left over: \['extra'\]"):
        _inputs(_workflow("CreateVideo", [24.0, "auto", "sRGB", "none", "extra"], link=("images", 2)), NEWEST)
    with pytest.raises(ValueError, match=r"required input 'video' is not connected"):
        _inputs(_workflow("SaveVideo", SAVE_VIDEO_H264), NEWEST)


KSAMPLER_VALUES = [42, "fixed", 20, 7.0, "euler", "simple", 1.0]
KSAMPLER_NAMED = {"seed": 42, "control_after_generate": "fixed", "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                  "scheduler": "simple", "denoise": 1.0}


@pytest.mark.parametrize("info", [OLD, NEWEST], ids=["0.3.64", "newest"])
def test_widgets_values_named_are_read_by_name_and_must_agree_with_the_positional_values(info):
    positional = _inputs(_workflow("KSampler", KSAMPLER_VALUES), info | {"KSampler": _widgets_only(info)})
    named = _inputs(_workflow("KSampler", named=KSAMPLER_NAMED), info | {"KSampler": _widgets_only(info)})
    both = _inputs(_workflow("KSampler", KSAMPLER_VALUES, KSAMPLER_NAMED), info | {"KSampler": _widgets_only(info)})
    assert positional == named == both == {k: v for k, v in KSAMPLER_NAMED.items() if k != "control_after_generate"}
    with pytest.raises(ValueError, match=r"disagree on \['seed'\]: \[43\] vs \[42\]"):
        _inputs(_workflow("KSampler", KSAMPLER_VALUES, {**KSAMPLER_NAMED, "seed": 43}),
                info | {"KSampler": _widgets_only(info)})
    with pytest.raises(ValueError, match="left over"):  # a named value no widget has
        _inputs(_workflow("KSampler", named={**KSAMPLER_NAMED, "sigma": 1}), info | {"KSampler": _widgets_only(info)})
    random = _workflow("KSampler", named={**KSAMPLER_NAMED, "control_after_generate": "sometimes"})
    assert _problems(random, info | {"KSampler": _widgets_only(info)}) == [
        "node 2: control value 'sometimes' after 'seed' is not one of ('fixed', 'increment', 'decrement', 'randomize')"]


def test_named_values_of_dynamic_combos_use_the_dotted_widget_names():
    named = dict(zip(["filename_prefix", "format", "format.codec", "format.codec.encoding",
                      "format.codec.encoding.crf", "codec"], SAVE_VIDEO_H264))
    assert _inputs(_workflow("SaveVideo", named=named, link=("video", 0)), NEWEST) == SAVE_VIDEO_H264_INPUTS
    assert _inputs(_workflow("SaveVideo", SAVE_VIDEO_H264, named, link=("video", 0)), NEWEST) == SAVE_VIDEO_H264_INPUTS


def test_the_upload_button_value_comes_after_the_optional_widgets():
    # The newest LoadVideo has an optional 'edit' widget; its upload button comes after it.
    newest_save = _workflow("LoadVideo", ["clip.mp4", NO_EDIT, "image"])
    assert _inputs(newest_save, NEWEST) == {"file": "clip.mp4", "edit": NO_EDIT}
    # A 0.3.64 save [file, upload] read by the newest frontend puts the button's value in 'edit'
    # (1.58.1's graphToPrompt sends edit='image'), on which the newest LoadVideo.execute fails ('image'.get).
    old_save = _workflow("LoadVideo", ["clip.mp4", "image"])
    assert _inputs(old_save, NEWEST)["edit"] == "image"
    assert _problems(old_save, NEWEST) == ["node 2 (LoadVideo): edit: 'image' is not a video edit (a dict)"]
    # [file, edit] suits both: 0.3.64 reads the second value as its upload button's, which it does not send.
    both = _workflow("LoadVideo", ["clip.mp4", NO_EDIT])
    assert _inputs(both, OLD) == {"file": "clip.mp4"}
    assert _inputs(both, NEWEST) == {"file": "clip.mp4", "edit": NO_EDIT}
    assert _problems(both, OLD) == _problems(both, NEWEST) == _problems(newest_save, NEWEST) == []


def test_a_multitype_input_is_a_widget_of_its_widget_type_and_takes_each_of_its_types():
    assert _inputs(_workflow("Preview3D", ["3d/mesh.glb"]), NEWEST) == {"model_file": "3d/mesh.glb"}
    linked = _workflow("Preview3D", [""], link=("model_file", 1))
    assert _inputs(linked, NEWEST) == {"model_file": ["1", 1]}
    assert _problems(linked, NEWEST) == []
    assert _problems(linked, OLD) == ["link 1: FILE_3D_GLB into Preview3D.model_file (STRING)"]
    image = _workflow("Preview3D", [""], link=("model_file", 2))
    assert _problems(image, NEWEST) == [
        "link 1: IMAGE into Preview3D.model_file "
        "(STRING,FILE_3D_GLB,FILE_3D_GLTF,FILE_3D_FBX,FILE_3D_OBJ,FILE_3D_STL,FILE_3D_USDZ,FILE_3D)"]


def _widgets_only(info: dict) -> dict:
    """KSampler's node info with its sockets optional, so a lone KSampler converts."""
    entry = {**info["KSampler"], "input": {"required": {}, "optional": {}}, "input_order": {}}
    for name, spec in info["KSampler"]["input"]["required"].items():
        category = "required" if spec[0] in ("INT", "FLOAT") or isinstance(spec[0], list) else "optional"
        entry["input"][category][name] = spec
    entry["input_order"] = {k: [n for n in info["KSampler"]["input_order"]["required"] if n in v]
                            for k, v in entry["input"].items()}
    return entry


@pytest.mark.parametrize("version", CORE_SNAPSHOTS)
def test_each_snapshot_says_where_it_came_from_and_holds_the_same_nodes(version):
    source = core_snapshot_source(version)
    assert set(core_node_info(version)) == set(OLD)  # every core node the workflows use, and Preview3D
    if version == INSTALLED_CORE:
        assert source["core"] == version and re.fullmatch("[0-9a-f]{40}", source["commit"])
        return
    assert set(source["by_node"]) == set(core_node_info(version))
    files = {text.split()[0] for text in source["by_node"].values()}
    read = {path for path, commit in source["read"].items() if re.fullmatch("[0-9a-f]{40}", commit)}
    assert files - read <= {"comfy_extras/nodes_load_3d.py", "comfy_extras/nodes_preview_any.py"}, files - read
