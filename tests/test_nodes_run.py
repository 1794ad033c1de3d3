"""Every node run on tiny models through ComfyUI stand-ins: types, shapes, caching, errors."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_stubs import stand_ins
from comfy_stubs.model_files import ADAPTER_FILE, ADAPTERS, TINY_BASE, adapter_choice, write_official_adapter
from comfy_stubs.model_files import write_tiny_models

BASE = f"diffusers/{TINY_BASE}"
SETTINGS = dict(steps=3, sampler="ddim", spacing="leading", processing_resolution=32, batch_size=4)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui")
    paths = write_tiny_models(root / "models")
    calls = stand_ins.install(root)
    pack = stand_ins.load_pack()
    yield SimpleNamespace(root=root, paths=paths, calls=calls, pack=pack, nodes=pack.NODE_CLASS_MAPPINGS,
                          engine=pack.dmp_model)
    stand_ins.unload_pack(pack)
    stand_ins.uninstall()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(0))


def load(env, *tasks, precision="auto", base=BASE):
    extra = {f"adapter_{i}": adapter_choice(task) for i, task in enumerate(tasks[1:], start=2)}
    return env.nodes["DMPLoader"]().load(base, adapter_choice(tasks[0]), precision, **extra)[0]


def predict(env, model, images, task="auto", **kw):
    return env.nodes["DMPPredict"]().predict(model, images, task, **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def everything(env, images):
    """Predictions of all five tasks from DMP Predict Tasks."""
    model = load(env, *ADAPTERS)
    return model, env.nodes["DMPPredictTasks"]().predict(model, images, **SETTINGS)


def _is_image(tensor, shape):
    return (tensor.shape == shape and tensor.dtype == torch.float32 and tensor.device.type == "cpu"
            and tensor.is_contiguous() and 0 <= float(tensor.min()) and float(tensor.max()) <= 1)


# Loading and caching --------------------------------------------------------------------------

def test_loaders_share_one_base_and_adding_adapters_does_not_reload(env):
    first = load(env, "depth")
    second = load(env, "depth", "normal")
    assert first.base is second.base and len(env.pack.nodes.models._BASES) == 1
    assert first.adapters == ("depth-hypersim-notext",)
    assert second.adapters == ("depth-hypersim-notext", "normal-scene100-notext")
    assert second.info("normal-scene100-notext").task == "normal"
    assert load(env, "depth", precision="fp32").base is first.base  # 'auto' is fp32 on the CPU


def test_another_loader_never_changes_a_models_results(env, images):
    first = load(env, "depth")
    before = predict(env, first, images)[1].raw
    # Another file that DMP would name the same: it gets its own name, the first stays as it was.
    folder = env.root / "models" / "dmp" / "v2" / "depth-hypersim-notext"
    twin = write_official_adapter(first.model.unet, folder, seed=42)
    other = env.nodes["DMPLoader"]().load(BASE, f"v2/depth-hypersim-notext/{ADAPTER_FILE}", "auto")[0]
    assert other.adapters == ("depth-hypersim-notext~2",)
    assert other.info("depth-hypersim-notext~2").task == "depth"
    assert not other.info("depth-hypersim-notext~2").uses_prompts  # facts from the path, not the name
    assert other.info("depth-hypersim-notext~2").target_scale == 8.0
    assert torch.equal(predict(env, first, images)[1].raw, before)
    assert not torch.equal(predict(env, other, images)[1].raw, before)
    twin.unlink()


def test_is_changed_follows_the_files(env):
    node = env.nodes["DMPLoader"]
    stamp = node.IS_CHANGED(BASE, adapter_choice("depth"), "auto", adapter_2="none")
    assert stamp == node.IS_CHANGED(BASE, adapter_choice("depth"), "auto", adapter_2="none")
    os.utime(env.paths["depth"], ns=(1, 1))
    assert stamp != node.IS_CHANGED(BASE, adapter_choice("depth"), "auto", adapter_2="none")


def _first_weight(model):
    return next(model.model.unet.parameters()).detach().clone()


def test_a_replaced_base_is_loaded_again(env):
    """Replacing a base's weights (a diffusers folder's unet/, a single file) loads it anew."""
    from dmp_model.tiny import build_tiny_components, save_tiny_sd
    from ldm_layout import write_single_file

    models, node = env.root / "models", env.nodes["DMPLoader"]
    folder = save_tiny_sd(models / "diffusers" / "replaced-sd1", components=build_tiny_components(seed=0))
    single = write_single_file(models / "checkpoints" / "replaced-sd1.safetensors", *build_tiny_components(seed=0))
    cache = env.pack.nodes.models._BASES
    try:
        for base, replace in [
            ("diffusers/replaced-sd1", lambda: build_tiny_components(seed=1)[0].save_pretrained(folder / "unet")),
            ("replaced-sd1.safetensors", lambda: write_single_file(single, *build_tiny_components(seed=1))),
        ]:
            first = load(env, "depth", base=base)
            stamp = node.IS_CHANGED(base, adapter_choice("depth"), "auto")
            assert load(env, "depth", base=base).base is first.base  # unchanged: the cached copy
            replace()
            assert node.IS_CHANGED(base, adapter_choice("depth"), "auto") != stamp  # ComfyUI runs the node
            second = load(env, "depth", base=base)
            assert second.base is not first.base and first.base not in cache.values()
            assert not torch.equal(_first_weight(second), _first_weight(first))
            assert second.info("depth-hypersim-notext").task == "depth"
    finally:
        for key in [k for k in cache if "replaced-sd1" in k[0]]:
            del cache[key]


# Prediction ------------------------------------------------------------------------------------

def test_predict_returns_a_comfy_image_and_the_raw_prediction(env, images):
    env.calls.progress.clear()
    emptied = env.calls.emptied
    visual, prediction = predict(env, load(env, "depth"), images)
    assert _is_image(visual, (2, 40, 56, 3))
    assert prediction.task == "depth" and prediction.raw.shape == (2, 40, 56)
    assert bool((prediction.raw >= 0).all())
    assert env.calls.progress == [(1, 3), (2, 3), (3, 3)]  # a step across the whole batch
    assert env.calls.emptied == emptied + 1


def test_predict_picks_the_adapter_of_the_task(env, images):
    model = load(env, "depth", "normal")
    assert predict(env, model, images, task="normal")[1].adapter == "normal-scene100-notext"
    assert predict(env, model, images, task="auto")[1].adapter == "depth-hypersim-notext"
    with pytest.raises(ValueError, match="no segmentation adapter.*depth-hypersim-notext \\(depth\\)"):
        predict(env, model, images, task="segmentation")


def test_predict_tasks_gives_every_task_from_one_encode(env, everything, images):
    model, outputs = everything
    depth, normal, segmentation, albedo, shading, previews = outputs
    assert [p.task for p in outputs[:5]] == ["depth", "normal", "segmentation", "albedo", "shading"]
    assert depth.raw.shape == (2, 40, 56) and shading.raw.shape == (2, 40, 56)
    assert normal.raw.shape == (2, 40, 56, 3) and albedo.raw.shape == (2, 40, 56, 3)
    assert segmentation.raw.dtype == torch.int64 and segmentation.raw.shape == (2, 40, 56)
    assert _is_image(previews, (10, 40, 56, 3))


def test_predict_tasks_blocks_the_outputs_of_missing_tasks(env, images):
    outputs = env.nodes["DMPPredictTasks"]().predict(load(env, "depth", "normal"), images, **SETTINGS)
    assert outputs[0].task == "depth" and outputs[1].task == "normal"
    for blocked, task in zip(outputs[2:5], ("segmentation", "albedo", "shading")):
        assert isinstance(blocked, stand_ins.ExecutionBlocker) and f"no {task} adapter" in blocked.message
    assert outputs[5].shape == (4, 40, 56, 3)


def test_interrupt_stops_a_run_and_the_next_run_works(env, images):
    model = load(env, "depth")
    env.calls.interrupted = True
    with pytest.raises(stand_ins.InterruptProcessingException):
        predict(env, model, images)
    assert predict(env, model, images)[1].raw.shape == (2, 40, 56)


def test_prompt_text_or_conditioning(env, images):
    model = load(env, "albedo")  # a prompted adapter (the paper's bedroom ones are); -notext ignore prompts
    plain = predict(env, model, images)[1].raw
    texted = predict(env, model, images, prompt="a bedroom")[1].raw
    embeds = model.model.text.encode(["a bedroom"])
    conditioned = predict(env, model, images, conditioning=[[embeds, {"pooled_output": None}]])[1].raw
    assert not torch.equal(plain, texted)
    torch.testing.assert_close(conditioned, texted)
    unguided = predict(env, model, images, prompt="a bedroom", guidance_scale=1.0)[1].raw
    assert not torch.equal(unguided, texted)
    with pytest.raises(ValueError, match="either a prompt text or a conditioning"):
        predict(env, model, images, prompt="x", conditioning=[[embeds, {}]])
    with pytest.raises(ValueError, match="do not fit this model"):  # SDXL/SD2 text encoders
        predict(env, model, images, conditioning=[[torch.zeros(1, 77, 2048), {}]])


def test_notext_adapters_ignore_prompts_and_predict_tasks_prompts_only_the_others(env, images):
    model = load(env, "depth", "albedo")  # depth-hypersim-notext, and a prompted albedo adapter
    depth = predict(env, model, images, task="depth")[1].raw
    assert torch.equal(predict(env, model, images, task="depth", prompt="a bedroom")[1].raw, depth)
    node = env.nodes["DMPPredictTasks"]()
    plain = node.predict(model, images, **SETTINGS)
    prompted = node.predict(model, images, prompt="a bedroom", **SETTINGS)
    assert torch.equal(prompted[0].raw, plain[0].raw) and torch.equal(prompted[0].raw, depth)
    assert not torch.equal(prompted[3].raw, plain[3].raw)


# Maps ------------------------------------------------------------------------------------------

def test_depth_maps(env, everything):
    depth = everything[1][0]
    control = env.nodes["DMPDepthToControlNet"]().convert(depth, "percentile", False, 2.0, 85.0)[0]
    assert _is_image(control, (2, 40, 56, 3))
    nearest = depth.raw[0].flatten().argmin()
    assert control[0].reshape(-1, 3)[nearest].tolist() == [1.0, 1.0, 1.0]  # near is white
    inverted = env.nodes["DMPDepthToControlNet"]().convert(depth, "disparity", True, 2.0, 85.0)[0]
    assert _is_image(inverted, (2, 40, 56, 3))
    colored = env.nodes["DMPDepthColorize"]().colorize(depth, "turbo", 2.0, 98.0, False)[0]
    reverse = env.nodes["DMPDepthColorize"]().colorize(depth, "turbo", 2.0, 98.0, True)[0]
    assert _is_image(colored, (2, 40, 56, 3)) and not torch.equal(colored, reverse)


def test_normal_map(env, everything):
    normal = everything[1][1]
    node = env.nodes["DMPNormalsToControlNet"]()
    control = node.convert(normal, "auto", False, False, False)[0]
    assert _is_image(control, (2, 40, 56, 3))
    torch.testing.assert_close(control, 1 - (normal.raw + 1) / 2)  # omnidata -> BAE inverts all axes
    flipped = node.convert(normal, "auto", True, False, False)[0]
    torch.testing.assert_close(flipped[..., 0], 1 - control[..., 0])


def test_segmentation_colors_mask_and_classes(env):
    engine = env.engine
    ids = torch.tensor([[[0, 0, 3], [3, 14, 0]]])  # wall, floor, door
    seg = engine.Prediction("segmentation", engine.AdapterInfo(task="segmentation"), ids,
                            engine.palettes.paint(ids, "dmp"))
    colors, mask, found = env.nodes["DMPSegmentation"]().convert(seg, "Wall, floor", "ade20k")
    assert _is_image(colors, (1, 2, 3, 3))
    torch.testing.assert_close(colors, engine.controlnet.segmentation_to_control(ids))
    assert mask.dtype == torch.float32 and mask.tolist() == [[[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]]
    assert found.splitlines() == ["wall: 50.0%", "floor: 33.3%", "door: 16.7%"]
    assert env.nodes["DMPSegmentation"]().convert(seg, "", "dmp")[1].sum() == 0
    with pytest.raises(ValueError, match="unknown ADE20K class .walls.*All valid names: wall, building, sky"):
        env.nodes["DMPSegmentation"]().convert(seg, "walls", "ade20k")


def test_segmentation_of_a_real_prediction(env, everything):
    colors, mask, found = env.nodes["DMPSegmentation"]().convert(everything[1][2], "wall", "ade20k")
    assert _is_image(colors, (2, 40, 56, 3)) and mask.shape == (2, 40, 56) and found


def test_intrinsics(env, everything):
    node = env.nodes["DMPIntrinsics"]()
    albedo, shading = node.convert(albedo=everything[1][3], shading=everything[1][4])
    assert _is_image(albedo, (2, 40, 56, 3)) and _is_image(shading, (2, 40, 56, 3))
    assert torch.equal(shading[..., 0], shading[..., 2])
    only = node.convert(albedo=everything[1][3])
    assert isinstance(only[1], stand_ins.ExecutionBlocker)
    with pytest.raises(ValueError, match="connect an albedo and/or a shading"):
        node.convert()


@pytest.mark.parametrize(("node_id", "args", "wanted"), [
    ("DMPDepthToControlNet", ("percentile", False, 2.0, 85.0), "depth"),
    ("DMPDepthColorize", ("Spectral", 2.0, 98.0, False), "depth"),
    ("DMPNormalsToControlNet", ("auto", False, False, False), "normal"),
    ("DMPSegmentation", ("wall", "ade20k"), "segmentation"),
])
def test_a_prediction_of_another_task_is_refused(env, everything, node_id, args, wanted):
    other = everything[1][4]  # shading
    node = env.nodes[node_id]()
    with pytest.raises(ValueError, match=f"needs a {wanted} prediction, but got a shading prediction"):
        getattr(node, node.FUNCTION)(other, *args)
    with pytest.raises(ValueError, match="no prediction is connected"):
        getattr(node, node.FUNCTION)(None, *args)


def test_intrinsics_refuse_swapped_inputs(env, everything):
    with pytest.raises(ValueError, match="needs a albedo prediction, but got a shading"):
        env.nodes["DMPIntrinsics"]().convert(albedo=everything[1][4])


# Saving ----------------------------------------------------------------------------------------

def test_save_depth_as_16_bit_png_with_comfy_counters(env, everything):
    depth = everything[1][0]
    node = env.nodes["DMPSave"]()
    ui = node.save(depth, "DMP/%task%", "png", "millimeters")["ui"]
    again = node.save(depth, "DMP/%task%", "png", "millimeters")["ui"]
    names = [f["filename"] for f in ui["dmp_files"] + again["dmp_files"]]
    assert names == ["depth_00001_.png", "depth_00002_.png", "depth_00003_.png", "depth_00004_.png"]
    folder = env.root / "output" / "DMP"
    metres, info = env.engine.writers.read_depth_png16(folder / "depth_00002_.png")
    assert info["encoding"] == "millimeters"
    np.testing.assert_allclose(metres, depth.raw[1].numpy(), atol=6e-4)
    assert [p["type"] for p in ui["images"]] == ["temp", "temp"]
    assert all((env.root / "temp" / p["subfolder"] / p["filename"]).is_file() for p in ui["images"])


def test_save_formats_are_the_engines_raw_formats(env):
    formats, options = env.nodes["DMPSave"].INPUT_TYPES()["required"]["format"]
    assert formats == list(env.engine.writers.RAW_FORMATS) == ["npy", "png", "exr"]
    assert options["default"] == "png"


def test_save_raw_values_as_npy_png_and_exr(env, everything):
    normal, segmentation = everything[1][1], everything[1][2]
    node = env.nodes["DMPSave"]()
    output = env.root / "output" / "raw"
    files = node.save(normal, "raw/%task%_%batch_num%", "npy", "millimeters")["ui"]["dmp_files"]
    assert [f["filename"] for f in files] == ["normal_0_00001_.npy", "normal_1_00002_.npy"]
    saved = np.load(output / files[1]["filename"])
    assert saved.dtype == np.float32
    np.testing.assert_array_equal(saved, normal.raw[1])
    ids = node.save(segmentation, "raw/seg", "npy", "millimeters")["ui"]["dmp_files"][0]
    saved = np.load(output / ids["filename"])
    assert saved.dtype == np.uint8
    np.testing.assert_array_equal(saved, segmentation.raw[0])
    png = node.save(segmentation, "raw/seg", "png", "millimeters")["ui"]["dmp_files"][1]
    with Image.open(output / png["filename"]) as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.asarray(image), segmentation.raw[1])
    if env.engine.writers.exr_available():
        assert node.save(normal, "raw/exr", "exr", "millimeters")["ui"]["dmp_files"]
    else:
        with pytest.raises(ValueError, match="pip install openexr"):
            node.save(normal, "raw/exr", "exr", "millimeters")
    with pytest.raises(ValueError, match="DMP Save: a normal prediction cannot be saved as png"):
        node.save(normal, "raw/n", "png", "millimeters")
    with pytest.raises(ValueError, match="DMP Save: a segmentation prediction cannot be saved as exr"):
        node.save(segmentation, "raw/n", "exr", "millimeters")


@pytest.mark.parametrize("file_format", ["npy", "png"])
def test_save_checks_every_image_before_writing_any(env, file_format):
    engine = env.engine
    raw = torch.rand(3, 4, 5) + 1
    raw[2, 1, 1] = float("nan")  # the last image is broken: the first two must not be written either
    depth = engine.Prediction("depth", engine.AdapterInfo(task="depth"), raw, torch.rand(3, 4, 5, 3))
    folder = env.root / "output" / "partial"
    with pytest.raises(ValueError, match="DMP Save: .*1 NaN or infinite values"):
        env.nodes["DMPSave"]().save(depth, "partial/depth", file_format, "millimeters")
    assert not folder.exists() or list(folder.iterdir()) == []
    ids = torch.zeros(2, 4, 5, dtype=torch.int64)
    ids[1, 0, 0] = 300  # not a class id a uint8 file can hold
    seg = engine.Prediction("segmentation", engine.AdapterInfo(task="segmentation"), ids, torch.rand(2, 4, 5, 3))
    with pytest.raises(ValueError, match="DMP Save: class ids .* must lie in 0..255"):
        env.nodes["DMPSave"]().save(seg, "partial/seg", file_format, "millimeters")
    assert not folder.exists() or list(folder.iterdir()) == []


# Bad input -------------------------------------------------------------------------------------

def test_missing_files_give_actionable_errors(env):
    loader = env.nodes["DMPLoader"]()
    with pytest.raises(FileNotFoundError, match="base model 'v1-5.safetensors' not found.*checkpoints"):
        loader.load("v1-5.safetensors", adapter_choice("depth"), "auto")
    with pytest.raises(FileNotFoundError, match="DMP adapter 'nope/x.safetensors' not found.*dmp model"):
        loader.load(BASE, "nope/x.safetensors", "auto")


def test_a_base_that_is_not_sd1_is_refused(env):
    with pytest.raises(ValueError, match="Stable Diffusion XL; DMP needs a Stable Diffusion 1.x") as err:
        env.nodes["DMPLoader"]().load("sdxl_base_1.0.safetensors", adapter_choice("depth"), "auto")
    assert type(err.value) is ValueError  # ComfyUI names the type; the engine's lives under a file path


def test_an_adapter_that_does_not_fit_is_refused_and_the_base_keeps_working(env, images):
    with pytest.raises(ValueError, match="adapter does not fit this UNet"):
        env.nodes["DMPLoader"]().load(BASE, f"depth-other-base/{ADAPTER_FILE}", "auto")
    assert predict(env, load(env, "depth"), images)[1].raw.shape == (2, 40, 56)


def test_a_bad_setting_names_itself(env, images):
    with pytest.raises(ValueError, match="processing_resolution"):
        predict(env, load(env, "depth"), images, processing_resolution=4)

