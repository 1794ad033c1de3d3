"""Every node run through ComfyUI stand-ins on tiny models: adapters on core's MODEL, prediction on
core's MODEL/VAE/CLIP (checked against the library), maps, saving, errors."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_stubs import core_models, stand_ins
from comfy_stubs.model_files import ADAPTER_FILE, ADAPTERS, adapter_choice, write_official_adapter, write_tiny_models

SETTINGS = dict(steps=3, sampler="ddim", spacing="leading", processing_resolution=32, batch_size=4)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import CLIPTokenizer

    from dmp_model import DMPModel
    from dmp_model.sd.tiny import build_tiny_components, save_tiny_sd

    root = tmp_path_factory.mktemp("comfyui")
    components = build_tiny_components(seed=0)
    library_base = save_tiny_sd(root / "library-base", components=components)  # the same weights, on disk
    paths = write_tiny_models(root / "models", components[0])
    calls = stand_ins.install(root)
    pack = stand_ins.load_pack()
    tokenizer = CLIPTokenizer.from_pretrained(str(library_base / "tokenizer"))
    model, vae, clip = core_models.core_objects(*components, tokenizer)
    library = DMPModel.from_pretrained(library_base, device="cpu", precision="fp32")
    yield SimpleNamespace(root=root, paths=paths, calls=calls, pack=pack, nodes=pack.NODE_CLASS_MAPPINGS,
                          engine=pack.dmp_model, model=model, vae=vae, clip=clip, library=library,
                          components=components, tokenizer=tokenizer)
    stand_ins.unload_pack(pack)
    stand_ins.uninstall()


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(0))


def load(env, *tasks, model=None, strength=1.0):
    """A DMP_MODEL with the adapters of `tasks`, chained through Load DMP Adapter."""
    dmp_model = None
    for task in tasks:
        dmp_model = env.nodes["DMPLoadAdapter"]().load(model or env.model, adapter_choice(task), strength,
                                                       dmp_model=dmp_model)[0]
    return dmp_model


def predict(env, dmp_model, images, task="auto", **kw):
    return env.nodes["DMPPredict"]().predict(dmp_model, env.vae, env.clip, images, task, **{**SETTINGS, **kw})


def predict_tasks(env, dmp_model, images, **kw):
    return env.nodes["DMPPredictTasks"]().predict(dmp_model, env.vae, env.clip, images, **{**SETTINGS, **kw})


def library_prediction(env, task, images, **kw):
    """What DMPModel.predict gives for the same weights, adapter file, images and settings."""
    env.library.load_adapter(env.paths[task].parent)  # named after its folder, as DMP names adapters
    return env.library.predict(images.movedim(-1, 1), ADAPTERS[task], **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def everything(env, images):
    """Predictions of all five tasks from DMP Predict Tasks."""
    dmp_model = load(env, *ADAPTERS)
    return dmp_model, predict_tasks(env, dmp_model, images)


def _is_image(tensor, shape):
    return (tensor.shape == shape and tensor.dtype == torch.float32 and tensor.device.type == "cpu"
            and tensor.is_contiguous() and 0 <= float(tensor.min()) and float(tensor.max()) <= 1)


def _lora_delta(adapter):
    """The weight change ComfyUI's patches make to the first patched layer, by hand."""
    key, patches = next(iter(adapter.model.patches.items()))
    strength, patch = patches[0]
    up, down = patch.weights[:2]
    return key, strength * (up @ down)


# Adapters on core's MODEL ---------------------------------------------------------------------

def test_an_adapter_patches_a_clone_of_the_model_and_carries_its_facts(env):
    dmp_model = load(env, "depth")
    (adapter,) = dmp_model.adapters
    assert adapter.name == "depth-hypersim-notext"
    assert (adapter.info.task, adapter.info.uses_prompts, adapter.info.target_scale) == ("depth", False, 8.0)
    assert (adapter.info.rank, adapter.info.self_attn_only) == (4, False)
    assert adapter.model is not env.model and adapter.model.model is env.model.model  # a clone, one base
    assert env.model.patches == {}  # the user's MODEL is not touched
    assert len(adapter.model.patches) == 128  # all 16 transformer blocks x (attn1, attn2) x 4 projections


def test_several_adapters_share_the_base_and_inputs_stay_unchanged(env):
    depth = load(env, "depth")
    both = env.nodes["DMPLoadAdapter"]().load(env.model, adapter_choice("normal"), 1.0, dmp_model=depth)[0]
    assert depth.names == ("depth-hypersim-notext",)  # what another node holds is never changed
    assert both.names == ("depth-hypersim-notext", "normal-scene100-notext")
    assert both.adapters[1].info.task == "normal"
    assert len({id(a.model.model) for a in both.adapters}) == 1
    parameters = {p.data_ptr() for p in env.model.model.parameters()}
    assert len(parameters) == sum(1 for _ in env.model.model.parameters())  # no second copy was made


def test_a_second_file_of_the_same_name_gets_its_own_name(env):
    twin = write_official_adapter(env.components[0], env.root / "models" / "dmp" / "v2" / "depth-hypersim-notext",
                                  seed=42)
    try:
        both = env.nodes["DMPLoadAdapter"]().load(env.model, "v2/depth-hypersim-notext/" + ADAPTER_FILE, 1.0,
                                                  dmp_model=load(env, "depth"))[0]
        assert both.names == ("depth-hypersim-notext", "depth-hypersim-notext~2")
        assert both.adapters[1].info.task == "depth" and not both.adapters[1].info.uses_prompts
    finally:
        twin.unlink()


def test_strength_and_task_override(env):
    half = load(env, "depth", strength=0.5).adapters[0]
    full = load(env, "depth").adapters[0]
    key, delta = _lora_delta(half)
    torch.testing.assert_close(delta, 0.5 * _lora_delta(full)[1])
    renamed = env.nodes["DMPLoadAdapter"]().load(env.model, adapter_choice("depth"), 1.0, task="shading")[0]
    assert renamed.adapters[0].info.task == "shading"


def test_adapters_of_models_loras_and_a_training_run_are_offered_but_not_its_state_files(env):
    choices = env.nodes["DMPLoadAdapter"].INPUT_TYPES()["required"]["adapter"][0]
    relative = [c.replace(os.sep, "/") for c in choices]
    assert adapter_choice("depth") in relative and "my-normals/" + ADAPTER_FILE in relative
    assert "runs/depth-run/" + ADAPTER_FILE in relative
    assert "runs/depth-run/checkpoints/step-000010/" + ADAPTER_FILE in relative
    assert not [c for c in relative if c.endswith((".pt", "optimizer.bin"))]
    lora = env.nodes["DMPLoadAdapter"]().load(env.model, "my-normals/" + ADAPTER_FILE, 1.0)[0]
    assert lora.adapters[0].info.task == "normal"  # from the file's metadata


def test_is_changed_follows_the_file(env):
    node = env.nodes["DMPLoadAdapter"]
    stamp = node.IS_CHANGED(adapter=adapter_choice("depth"), strength=1.0, task="auto")
    assert stamp == node.IS_CHANGED(adapter=adapter_choice("depth"), strength=1.0, task="auto")
    os.utime(env.paths["depth"], ns=(1, 1))
    assert stamp != node.IS_CHANGED(adapter=adapter_choice("depth"), strength=1.0, task="auto")


# Prediction on core's MODEL, VAE and CLIP -------------------------------------------------------

def test_predict_equals_the_library_on_the_same_weights(env, images):
    visual, prediction, *_uncertainty = predict(env, load(env, "depth"), images)
    expected = library_prediction(env, "depth", images)
    assert _is_image(visual, (2, 40, 56, 3)) and prediction.raw.shape == (2, 40, 56)
    span = float(expected.raw.max() - expected.raw.min())
    assert span > 0.01
    assert float((prediction.raw - expected.raw).abs().max()) < 1e-4 * span
    # The colour map is a lookup table: a value on a bin edge may land in the next bin.
    assert float((visual - expected.visual).abs().mean()) < 1e-4


def test_tiles_and_flip_ensembles_equal_the_library_with_uncertainty_outputs(env, images):
    large = dict(processing_resolution=16, tile=True, tile_size=24, ensemble="flip")  # 40 x 56: 2 x 3 tiles
    visual, prediction, uncertainty, mask = predict(env, load(env, "depth"), images, **large)
    expected = library_prediction(env, "depth", images, **large)
    span = float(expected.raw.max() - expected.raw.min())
    assert float((prediction.raw - expected.raw).abs().max()) < 1e-4 * span
    assert float((prediction.uncertainty - expected.uncertainty).abs().max()) < 1e-4 * span
    assert float(prediction.uncertainty.max()) > 0  # the mirror disagrees somewhere on random images
    assert _is_image(uncertainty, (2, 40, 56, 3)) and mask.shape == (2, 40, 56)
    assert torch.equal(mask, uncertainty[..., 0])  # a channel of the grey image: a copy, exact
    assert float((uncertainty - expected.uncertainty_visual).abs().max()) < 1e-3
    tasks = predict_tasks(env, load(env, "depth", "normal"), images, ensemble="flip")
    image, tasks_mask = env.nodes["DMPUncertainty"]().uncertainty(tasks[1])
    assert torch.equal(image, tasks[1].uncertainty_visual) and torch.equal(tasks_mask, image[..., 0])  # copies


def test_without_an_ensemble_the_uncertainty_outputs_say_how_to_get_one(env, images):
    _visual, prediction, uncertainty, mask = predict(env, load(env, "depth"), images)
    for blocked in (uncertainty, mask):
        assert isinstance(blocked, stand_ins.ExecutionBlocker) and "set ensemble to 'flip'" in blocked.message
    with pytest.raises(ValueError, match="depth prediction has no uncertainty; set ensemble to 'flip'"):
        env.nodes["DMPUncertainty"]().uncertainty(prediction)
    with pytest.raises(ValueError, match="tile_overlap"):
        predict(env, load(env, "depth"), images, tile=True, tile_overlap=0.9)


def test_the_unet_is_called_in_the_models_compute_dtype_and_gives_float32(env):
    """As ComfyUI's apply_model: inputs cast to the weights' dtype (bf16 here), output as float32."""
    import copy

    bridge = env.pack.nodes.comfy_bridge
    half = core_models.ModelPatcher(core_models.BaseModel(copy.deepcopy(env.components[0]).to(torch.bfloat16)))
    generator = torch.Generator().manual_seed(3)
    z, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)
    full = bridge.call_unet(env.model, z, 501, context)
    low = bridge.call_unet(half, z, 501, context)
    assert full.dtype == low.dtype == torch.float32
    torch.testing.assert_close(low, full, atol=0.1, rtol=0.05)


def test_predict_tasks_equals_the_library_with_one_encode(env, images):
    encoded = env.vae.encoded
    depth, normal, *_blocked, previews = predict_tasks(env, load(env, "depth", "normal"), images)
    assert env.vae.encoded - encoded == 2  # two images, one encode each for both tasks
    torch.testing.assert_close(normal.raw, library_prediction(env, "normal", images).raw, atol=1e-4, rtol=0)
    torch.testing.assert_close(depth.raw, library_prediction(env, "depth", images).raw, atol=1e-4, rtol=0)
    assert _is_image(previews, (4, 40, 56, 3))


def test_prompted_adapters_take_the_prompt_like_the_library(env, images):
    dmp_model = load(env, "albedo")  # a prompted adapter (the paper's bedroom ones are)
    texted = predict(env, dmp_model, images, prompt="a bedroom")[1].raw
    torch.testing.assert_close(texted, library_prediction(env, "albedo", images, prompt="a bedroom").raw,
                               atol=1e-4, rtol=0)
    plain = predict(env, dmp_model, images)[1].raw
    assert not torch.equal(plain, texted)
    embeds = env.clip.encode_from_tokens(env.clip.tokenize("a bedroom"))
    conditioned = predict(env, dmp_model, images, conditioning=[[embeds, {"pooled_output": None}]])[1].raw
    torch.testing.assert_close(conditioned, texted)
    assert not torch.equal(predict(env, dmp_model, images, prompt="a bedroom", guidance_scale=1.0)[1].raw, texted)
    with pytest.raises(ValueError, match="either a prompt text or a conditioning"):
        predict(env, dmp_model, images, prompt="x", conditioning=[[embeds, {}]])
    with pytest.raises(ValueError, match="do not fit this model"):  # SDXL/SD2 text encoders
        predict(env, dmp_model, images, conditioning=[[torch.zeros(1, 77, 2048), {}]])


def test_notext_adapters_ignore_prompts_and_predict_tasks_prompts_only_the_others(env, images):
    dmp_model = load(env, "depth", "albedo")
    depth = predict(env, dmp_model, images, task="depth")[1].raw
    # Exact by construction: an ignored prompt leaves the same calls on the same batch (one batch of 2 images,
    # task by task, in DMP Predict Tasks too).
    assert torch.equal(predict(env, dmp_model, images, task="depth", prompt="a bedroom")[1].raw, depth)
    plain = predict_tasks(env, dmp_model, images)
    prompted = predict_tasks(env, dmp_model, images, prompt="a bedroom")
    assert torch.equal(prompted[0].raw, plain[0].raw) and torch.equal(prompted[0].raw, depth)
    assert not torch.equal(prompted[3].raw, plain[3].raw)


def test_the_empty_prompt_is_encoded_once_per_clip(env, images):
    dmp_model = load(env, "depth")
    predict(env, dmp_model, images)
    before = env.clip.encoded.count("")
    predict(env, dmp_model, images)
    predict_tasks(env, dmp_model, images)
    assert before == 1 and env.clip.encoded.count("") == 1


def test_progress_per_step_memory_calls_and_cache(env, images):
    env.calls.progress.clear()
    env.calls.loaded.clear()
    emptied = env.calls.emptied
    predict(env, load(env, "depth"), images)
    assert env.calls.progress == [(1, 3), (2, 3), (3, 3)]  # a step across the whole batch
    assert env.calls.emptied == emptied + 1
    loaded = [m for models in env.calls.loaded for m in models]
    assert any(isinstance(m, core_models.ModelPatcher) and m.model is env.model.model for m in loaded)
    assert any(m is env.vae.patcher for m in loaded)  # ComfyUI loads its VAE for decoding


def test_predict_picks_the_adapter_of_the_task(env, images):
    dmp_model = load(env, "depth", "normal")
    assert predict(env, dmp_model, images, task="normal")[1].adapter == "normal-scene100-notext"
    assert predict(env, dmp_model, images, task="auto")[1].adapter == "depth-hypersim-notext"
    with pytest.raises(ValueError, match="no segmentation adapter.*depth-hypersim-notext \\(depth\\)"):
        predict(env, dmp_model, images, task="segmentation")


def test_predict_tasks_gives_every_task(env, everything):
    _model, outputs = everything
    depth, normal, segmentation, albedo, shading, previews = outputs
    assert [p.task for p in outputs[:5]] == ["depth", "normal", "segmentation", "albedo", "shading"]
    assert depth.raw.shape == (2, 40, 56) and shading.raw.shape == (2, 40, 56)
    assert normal.raw.shape == (2, 40, 56, 3) and albedo.raw.shape == (2, 40, 56, 3)
    assert segmentation.raw.dtype == torch.int64 and segmentation.raw.shape == (2, 40, 56)
    assert _is_image(previews, (10, 40, 56, 3))


def test_predict_tasks_blocks_the_outputs_of_missing_tasks(env, images):
    outputs = predict_tasks(env, load(env, "depth", "normal"), images)
    assert outputs[0].task == "depth" and outputs[1].task == "normal"
    for blocked, task in zip(outputs[2:5], ("segmentation", "albedo", "shading")):
        assert isinstance(blocked, stand_ins.ExecutionBlocker) and f"no {task} adapter" in blocked.message
    assert outputs[5].shape == (4, 40, 56, 3)


def test_interrupt_stops_between_steps_and_the_next_run_works(env, images):
    dmp_model = load(env, "depth")
    progress = env.calls.progress
    progress.clear()
    original = stand_ins.sys.modules["comfy.utils"].ProgressBar.update_absolute

    def cancel_after_the_first_step(bar, value, total=None, preview=None):
        original(bar, value, total, preview)
        env.calls.interrupted = True

    stand_ins.sys.modules["comfy.utils"].ProgressBar.update_absolute = cancel_after_the_first_step
    try:
        with pytest.raises(stand_ins.InterruptProcessingException):
            predict(env, dmp_model, images)
    finally:
        stand_ins.sys.modules["comfy.utils"].ProgressBar.update_absolute = original
    assert progress == [(1, 3)]  # stopped at the next step
    assert predict(env, dmp_model, images)[1].raw.shape == (2, 40, 56)


# Video: a batch of frames -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def frames():
    """A clip: one image panned by a pixel per frame."""
    scene = torch.rand(1, 40, 64, 3, generator=torch.Generator().manual_seed(5))
    return torch.cat([scene[:, :, i:i + 56] for i in range(4)])


def test_video_batches_align_depth_over_time_and_share_one_range(env, frames):
    from dmp_model.prediction.temporal import TemporalAligner

    dmp_model = load(env, "depth")
    still = predict(env, dmp_model, frames)[1]
    video = predict(env, dmp_model, frames, batch_kind="video")[1]
    unaligned = predict(env, dmp_model, frames, batch_kind="video", temporal_alignment=0.0)[1]
    assert (still.visual_range, video.visual_range) == ("image", "batch")
    assert torch.equal(unaligned.raw, still.raw)  # alignment is the only change to the values (same calls: exact)
    torch.testing.assert_close(video.raw, TemporalAligner(1.0)(still.raw))  # the engine's aligner, in order
    assert not torch.equal(video.raw[1:], still.raw[1:])
    in_chunks = predict(env, dmp_model, frames, batch_kind="video", batch_size=1)[1]
    # The reference runs on across chunks; batches of 1 round otherwise (~4e-5 m measured, 2 threads).
    torch.testing.assert_close(in_chunks.raw, video.raw, atol=1e-4 * float(video.raw.abs().max()), rtol=1e-4)
    assert torch.equal(predict(env, dmp_model, frames, temporal_alignment=0.0)[1].raw, still.raw)  # images: unused


def test_depth_maps_follow_the_predictions_range_unless_told(env, frames):
    dmp_model = load(env, "depth")
    still = predict(env, dmp_model, frames)[1]
    video = predict(env, dmp_model, frames, batch_kind="video")[1]
    node = env.nodes["DMPDepthToControlNet"]()
    control = {mode: node.convert(video, "percentile", False, 2.0, 85.0, range_mode=mode)[0]
               for mode in ("auto", "image", "batch")}
    assert torch.equal(control["auto"], control["batch"]) and not torch.equal(control["auto"], control["image"])
    assert torch.equal(node.convert(still, "percentile", False, 2.0, 85.0)[0],
                       node.convert(still, "percentile", False, 2.0, 85.0, range_mode="image")[0])
    near = float(still.raw.min()) + 1e-3
    fixed = node.convert(still, "percentile", False, 2.0, 85.0, range_mode="fixed", near=near, far=near + 1)[0]
    assert fixed[still.raw <= near].min() == 1.0  # nearer than near: white
    colorize = env.nodes["DMPDepthColorize"]()
    assert torch.equal(colorize.colorize(video, "gray", 0.0, 100.0, False)[0],
                       colorize.colorize(video, "gray", 0.0, 100.0, False, range_mode="batch")[0])
    with pytest.raises(ValueError, match="0 < near < far"):
        node.convert(still, "percentile", False, 2.0, 85.0, range_mode="fixed", near=5.0, far=1.0)


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
                            engine.tasks.palettes.paint(ids, "dmp"))
    colors, mask, found = env.nodes["DMPSegmentation"]().convert(seg, "Wall, floor", "ade20k")
    assert _is_image(colors, (1, 2, 3, 3))
    torch.testing.assert_close(colors, engine.tasks.controlnet.segmentation_to_control(ids))
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
    assert torch.equal(shading[..., 0], shading[..., 2])  # grey repeated to RGB: copies, exact
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
    metres, info = env.engine.io.writers.read_depth_png16(folder / "depth_00002_.png")
    assert info["encoding"] == "millimeters"
    # Whole millimetres: 0.5 mm of rounding plus float32 rounding of metres below 8 (< 1e-6).
    np.testing.assert_allclose(metres, depth.raw[1].numpy(), atol=6e-4)
    assert [p["type"] for p in ui["images"]] == ["temp", "temp"]
    assert all((env.root / "temp" / p["subfolder"] / p["filename"]).is_file() for p in ui["images"])


def test_save_formats_are_the_engines_raw_formats(env):
    formats, options = env.nodes["DMPSave"].INPUT_TYPES()["required"]["format"]
    assert formats == list(env.engine.io.writers.RAW_FORMATS) == ["npy", "png", "exr"]
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
    if env.engine.io.writers.exr_available():
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
    generator = torch.Generator().manual_seed(6)
    raw = torch.rand(3, 4, 5, generator=generator) + 1
    raw[2, 1, 1] = float("nan")  # the last image is broken: the first two must not be written either
    depth = engine.Prediction("depth", engine.AdapterInfo(task="depth"), raw,
                              torch.rand(3, 4, 5, 3, generator=generator))
    folder = env.root / "output" / "partial"
    with pytest.raises(ValueError, match="DMP Save: .*1 NaN or infinite values"):
        env.nodes["DMPSave"]().save(depth, "partial/depth", file_format, "millimeters")
    assert not folder.exists() or list(folder.iterdir()) == []
    ids = torch.zeros(2, 4, 5, dtype=torch.int64)
    ids[1, 0, 0] = 300  # not a class id a uint8 file can hold
    seg = engine.Prediction("segmentation", engine.AdapterInfo(task="segmentation"), ids,
                            torch.rand(2, 4, 5, 3, generator=generator))
    with pytest.raises(ValueError, match="DMP Save: class ids .* must lie in 0..255"):
        env.nodes["DMPSave"]().save(seg, "partial/seg", file_format, "millimeters")
    assert not folder.exists() or list(folder.iterdir()) == []


# Bad input -------------------------------------------------------------------------------------

def test_a_model_that_is_not_sd1_is_refused_naming_it(env):
    sdxl = core_models.ModelPatcher(core_models.BaseModel(env.components[0], core_models.SDXL))
    with pytest.raises(ValueError, match="this MODEL is SDXL") as err:
        env.nodes["DMPLoadAdapter"]().load(sdxl, adapter_choice("depth"), 1.0)
    assert type(err.value) is ValueError
    inpainting = core_models.ModelPatcher(core_models.BaseModel(env.components[0], in_channels=9))
    with pytest.raises(ValueError, match="9 \\(an inpainting"):
        env.nodes["DMPLoadAdapter"]().load(inpainting, adapter_choice("depth"), 1.0)
    with pytest.raises(ValueError, match="expected a MODEL"):
        env.nodes["DMPLoadAdapter"]().load(env.vae, adapter_choice("depth"), 1.0)


@pytest.mark.parametrize(("choice", "message"), [
    ("sdxl_detail_lora.safetensors", "adapter does not fit this model: 0 of 3 LoRA layers fit"),
    (f"depth-other-base/{ADAPTER_FILE}", "adapter does not fit this model: 0 of 128 LoRA layers fit"),
])
def test_an_adapter_that_does_not_fit_is_refused_and_the_model_keeps_working(env, images, choice, message):
    with pytest.raises(ValueError, match=message):
        env.nodes["DMPLoadAdapter"]().load(env.model, choice, 1.0)
    assert env.model.patches == {}
    assert predict(env, load(env, "depth"), images)[1].raw.shape == (2, 40, 56)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("corrupt.safetensors", b"\x00\x01garbage" * 10, "corrupt.safetensors"),
    ("truncated.safetensors", None, "truncated.safetensors"),
    ("evil/pytorch_lora_weights.bin", "pickle", "not loaded for safety"),
])
def test_corrupt_truncated_and_pickled_files_are_refused(env, name, content, message):
    path = env.root / "models" / "dmp" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        whole = env.paths["depth"].read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif content == "pickle":
        class Payload:
            def __reduce__(self):
                return (os.system, ("echo code ran",))
        path.write_bytes(pickle.dumps({"x": Payload()}))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        env.nodes["DMPLoadAdapter"]().load(env.model, name, 1.0)
    assert type(err.value) is ValueError  # not the engine's CheckpointError: ComfyUI shows its module path


def test_missing_adapter_and_other_bases_are_refused(env, images):
    with pytest.raises(FileNotFoundError, match="DMP adapter 'nope/x.safetensors' not found.*models/loras"):
        env.nodes["DMPLoadAdapter"]().load(env.model, "nope/x.safetensors", 1.0)
    other = core_models.ModelPatcher(core_models.BaseModel(env.components[0]))
    with pytest.raises(ValueError, match="adapters on another MODEL"):
        env.nodes["DMPLoadAdapter"]().load(other, adapter_choice("normal"), 1.0, dmp_model=load(env, "depth"))


def test_a_vae_or_clip_of_another_family_is_refused(env, images):
    from dmp_model.sd.tiny import build_tiny_components

    dmp_model = load(env, "depth")
    flux_like = core_models.VAE(env.components[1], latent_channels=16)
    with pytest.raises(ValueError, match="DMP needs the SD 1.x VAE .* 16 channels"):
        env.nodes["DMPPredict"]().predict(dmp_model, flux_like, env.clip, images, "depth", **SETTINGS)
    wide = core_models.CLIP(build_tiny_components(seed=0, text_width=48)[2], env.tokenizer)
    with pytest.raises(ValueError, match="embeddings of width 48, but the SD 1.x MODEL expects 32"):
        env.nodes["DMPPredict"]().predict(dmp_model, env.vae, wide, images, "depth", **SETTINGS)


def test_a_bad_setting_names_itself(env, images):
    with pytest.raises(ValueError, match="processing_resolution"):
        predict(env, load(env, "depth"), images, processing_resolution=4)
