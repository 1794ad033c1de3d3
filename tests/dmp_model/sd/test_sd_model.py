"""End to end on the tiny model: parity with the reference's loop, determinism, tasks, bad input."""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from dmp_model import DMPModel, PredictOptions
from factories import merged_unet, random_lora, write_official_adapter


@pytest.fixture(scope="module")
def parity(tiny_base, tmp_path_factory):
    """Our model with one adapter, and the reference's ingredients built independently of our code."""
    model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    pristine = copy.deepcopy(model.unet)
    folder = write_official_adapter(model.unet, tmp_path_factory.mktemp("parity") / "depth-p-notext", seed=21,
                                    scale=0.3)
    model.load_adapter(folder, uses_prompts=True)  # also run with prompts, as the paper's prompted adapters
    reference_unet = merged_unet(pristine, random_lora(pristine, seed=21, scale=0.3))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_base, subfolder="text_encoder").eval()
    return model, reference_unet, tokenizer, text_encoder, tiny_base


def embed(tokenizer, text_encoder, prompts):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def oracle_step(scheduler, model_output, t, sample, input_sample):
    """The reference repository's modified DDIM step (ddim.py), eta = 0, clip_sample False."""
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    a = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        pred_original = (sample - (1 - a) ** 0.5 * model_output) / a**0.5
        pred_epsilon = model_output
    elif kind == "sample":
        pred_original, pred_epsilon = model_output, input_sample
    else:
        pred_original, pred_epsilon = a**0.5 * sample - (1 - a) ** 0.5 * model_output, input_sample
    return a_prev**0.5 * pred_original + (1 - a_prev) ** 0.5 * pred_epsilon


def reference_loop(unet, base, src_latents, steps, prediction_type, oracle, uncond, text=None, guidance=2.0,
                   spacing="leading"):
    """Pipeline.infer_batch of the reference implementation, restated (its latents in, its latents out)."""
    scheduler = DDIMScheduler.from_pretrained(base, subfolder="scheduler", timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    scheduler.register_to_config(prediction_type=prediction_type)
    latents = src_latents
    with torch.no_grad():
        for t in scheduler.timesteps:
            if text is None:
                noise = unet(latents, t, encoder_hidden_states=uncond.repeat(latents.size(0), 1, 1)).sample
            else:
                cond = torch.cat([text, uncond.repeat(text.size(0), 1, 1)])
                noise, noise_uncond = unet(latents.repeat(2, 1, 1, 1), t, encoder_hidden_states=cond).sample.chunk(2)
                noise = noise_uncond + guidance * (noise - noise_uncond)
            if oracle:
                latents = oracle_step(scheduler, noise, t, latents, src_latents)
            else:
                latents = scheduler.step(noise, t, latents).prev_sample
    return latents


def random_images(*shape: int, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] from a seeded generator (where the values do not matter, they still do not vary)."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


CASES = [(5, "v_prediction", False), (5, "v_prediction", True), (1, "v_prediction", False), (10, "sample", True),
         (10, "epsilon", False), (2, "sample", False), (3, "epsilon", True)]


@pytest.mark.parametrize("steps, prediction_type, oracle", CASES)
def test_final_latents_match_the_reference_without_prompt(parity, steps, prediction_type, oracle):
    model, reference_unet, tokenizer, text_encoder, base = parity
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    uncond = embed(tokenizer, text_encoder, [""])
    ours = model.sample(x, "depth-p-notext", steps=steps, prediction_type=prediction_type,
                        sampler="oracle" if oracle else "ddim")
    expected = reference_loop(reference_unet, base, x, steps, prediction_type, oracle, uncond)
    # Both sides do the same float operations (the reference's DDIM formulas in its order, W + up @ down
    # from the same tensors), and agree to the bit here; an implementation reordering one operation would
    # leave fp32 rounding, ~1e-6 of the latents ('sample' latents reach ~30), far below these bounds.
    torch.testing.assert_close(ours, expected, atol=5e-4, rtol=0)
    assert (ours - expected).abs().max() < 1e-4 * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("guidance", [2.0, 3.5])
@pytest.mark.parametrize("oracle", [False, True])
def test_final_latents_match_the_reference_with_prompts_and_guidance(parity, guidance, oracle):
    model, reference_unet, tokenizer, text_encoder, base = parity
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    prompts = ["a bedroom with a bed", "a small kitchen"]
    ours = model.sample(x, "depth-p-notext", prompt=prompts, guidance_scale=guidance,
                        sampler="oracle" if oracle else "ddim")
    expected = reference_loop(reference_unet, base, x, 5, "v_prediction", oracle, embed(tokenizer, text_encoder, [""]),
                              text=embed(tokenizer, text_encoder, prompts), guidance=guidance)
    torch.testing.assert_close(ours, expected, atol=5e-4, rtol=0)


def test_prompt_embeddings_equal_text_prompts(parity):
    """ComfyUI hands over embeddings (its CLIP Text Encode output): same result as the text."""
    model, _, tokenizer, text_encoder, _ = parity
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    by_text = model.sample(x, "depth-p-notext", prompt="a bedroom")
    by_embeds = model.sample(x, "depth-p-notext", prompt_embeds=embed(tokenizer, text_encoder, ["a bedroom"]))
    torch.testing.assert_close(by_text, by_embeds, atol=1e-5, rtol=0)


def test_trailing_spacing_matches_the_reference_scheduler(parity):
    model, reference_unet, tokenizer, text_encoder, base = parity
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    ours = model.sample(x, "depth-p-notext", steps=1, spacing="trailing")
    expected = reference_loop(reference_unet, base, x, 1, "v_prediction", False, embed(tokenizer, text_encoder, [""]),
                              spacing="trailing")
    torch.testing.assert_close(ours, expected, atol=5e-4, rtol=0)


def test_predict_encodes_with_the_latent_mean_and_returns_the_sampled_latents(tiny_model):
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    result = tiny_model.predict(images, "depth-test-notext", processing_resolution=0, return_latents=True)
    pixels = images * 2 - 1
    with torch.no_grad():
        mean = tiny_model.vae.encode(pixels).latent_dist.mean * tiny_model.vae.config.scaling_factor
    # The same VAE and sampler calls on the same [2, ...] batches: the same operations (exact here).
    torch.testing.assert_close(result.input_latents, mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(result.latents, tiny_model.sample(mean, "depth-test-notext"), atol=1e-6, rtol=0)


def test_two_runs_give_identical_bytes(tiny_model):
    images = torch.rand(2, 3, 40, 24, generator=torch.Generator().manual_seed(2))
    first = tiny_model.predict(images, "depth-test-notext", processing_resolution=64, return_latents=True)
    second = tiny_model.predict(images, "depth-test-notext", processing_resolution=64, return_latents=True)
    # Exact by construction: the same call on the same inputs in one process (same shapes, same threads).
    assert first.raw.numpy().tobytes() == second.raw.numpy().tobytes()
    assert first.latents.numpy().tobytes() == second.latents.numpy().tobytes()


@pytest.mark.parametrize("task, raw_shape, dtype", [
    ("depth", (2, 30, 44), torch.float32), ("normal", (2, 30, 44, 3), torch.float32),
    ("segmentation", (2, 30, 44), torch.int64), ("albedo", (2, 30, 44, 3), torch.float32),
    ("shading", (2, 30, 44), torch.float32), ("rgb", (2, 30, 44, 3), torch.float32)])
def test_every_task_returns_its_documented_layout_at_the_input_size(tiny_model, task, raw_shape, dtype):
    images = torch.rand(2, 3, 30, 44, generator=torch.Generator().manual_seed(3))
    tiny_model.load_adapter(tiny_model._adapters["depth-test-notext"].file, name=f"as-{task}", task=task)
    result = tiny_model.predict(images, f"as-{task}", processing_resolution=64)
    assert result.task == task and tuple(result.raw.shape) == raw_shape and result.raw.dtype == dtype
    assert result.visual.shape == (2, 30, 44, 3) and result.visual.dtype == torch.float32
    assert 0 <= result.visual.min() and result.visual.max() <= 1
    if task == "normal":
        torch.testing.assert_close(result.raw.norm(dim=-1), torch.ones(raw_shape[:-1]), atol=1e-4, rtol=0)
    if task == "depth":
        assert result.raw.min() >= 0
    if task == "segmentation":
        assert 0 <= result.raw.min() and result.raw.max() < 150


def test_several_tasks_from_one_encode_equal_separate_calls(tiny_model):
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    calls = []
    encode = tiny_model.encode
    tiny_model.encode = lambda pixels: calls.append(1) or encode(pixels)
    try:
        both = tiny_model.predict_tasks(images, ["depth-test-notext", "normal-test-notext"], processing_resolution=0)
    finally:
        tiny_model.encode = encode
    assert len(calls) == 1
    alone = tiny_model.predict(images, "normal-test-notext", processing_resolution=0)
    # Sequential tasks run each adapter on the same latents and batch as a call alone: the same operations.
    torch.testing.assert_close(both["normal-test-notext"].raw, alone.raw, atol=1e-6, rtol=0)
    assert set(both) == {"depth-test-notext", "normal-test-notext"}


def test_batch_size_does_not_change_results(tiny_model):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    whole = tiny_model.predict(images, "depth-test-notext", processing_resolution=0, batch_size=3)
    chunked = tiny_model.predict(images, "depth-test-notext", processing_resolution=0, batch_size=1)
    # Other batch shapes sum in other orders: fp32 rounding, ~2e-6 of the depth (decoded metres, up to ~8).
    torch.testing.assert_close(whole.raw, chunked.raw, atol=1e-4 * float(whole.raw.abs().max()), rtol=0)


def test_progress_counts_every_step_and_an_interrupt_leaves_the_model_usable(tiny_model):
    images = random_images(3, 3, 16, 16)
    seen = []
    tiny_model.predict_tasks(images, ["depth-test-notext", "normal-test-notext"], processing_resolution=0,
                             batch_size=2, steps=3, callback=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 12) for i in range(1, 13)]  # 3 steps x 2 chunks x 2 adapters

    class Interrupted(Exception):
        pass

    def interrupt(done, total):
        if done == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        tiny_model.predict(images, "depth-test-notext", processing_resolution=0, callback=interrupt)
    assert tiny_model.predict(images, "depth-test-notext", processing_resolution=0).raw.shape == (3, 16, 16)


def test_inputs_of_every_common_kind_are_converted(tiny_model):
    rgb = (np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, np.full((24, 24), 255, np.uint8)]), "RGBA")
    grey16 = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
    expected = tiny_model.predict(Image.fromarray(rgb), processing_resolution=0, adapter="depth-test-notext").raw
    for image in (rgba, rgb, [Image.fromarray(rgb)]):
        torch.testing.assert_close(tiny_model.predict(image, "depth-test-notext", processing_resolution=0).raw,
                                   expected, atol=1e-5, rtol=0)
    assert tiny_model.predict(grey16, "depth-test-notext", processing_resolution=0).raw.shape == (1, 24, 24)


def test_a_one_pixel_image_is_predicted_at_its_size(tiny_model):
    result = tiny_model.predict(random_images(1, 3, 1, 1), "depth-test-notext", processing_resolution=0)
    assert result.raw.shape == (1, 1, 1) and torch.isfinite(result.raw).all()


@pytest.mark.parametrize("images, message", [
    (random_images(0, 3, 16, 16), "empty batch"),
    ([], "empty batch"),
    (torch.full((1, 3, 16, 16), float("nan")), "NaN or infinite"),
    (random_images(1, 3, 16, 16).index_fill_(2, torch.tensor([3]), float("inf")), "NaN or infinite"),
    ([random_images(3, 16, 16), random_images(3, 16, 24)], "different sizes"),
    (random_images(1, 5, 16, 16), "must be"),
])
def test_bad_images_are_refused_before_any_work(tiny_model, images, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.predict(images, "depth-test-notext")


@pytest.mark.parametrize("settings, error, message", [
    ({"steps": 0}, ValueError, r"steps must be an integer in \[1, 999\], got 0"),
    ({"steps": "five"}, TypeError, "steps must be an integer"),
    ({"processing_resolution": "512px"}, TypeError, "processing_resolution must be an integer"),
    ({"processing_resolution": -1}, ValueError, "processing_resolution must be an integer >= 0, got -1"),
    ({"processing_resolution": 4}, ValueError, "processing_resolution must be 0 .native. or at least 8, got 4"),
    ({"sampler": "euler"}, ValueError, "sampler must be one of"),
    ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be a finite number"),
    ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, got 0"),
    ({"colour": "red"}, TypeError, "unknown prediction settings"),
])
def test_bad_settings_are_refused(tiny_model, settings, error, message):
    with pytest.raises(error, match=message):
        tiny_model.predict(random_images(1, 3, 16, 16), "depth-test-notext", **settings)


def test_prompt_embeddings_of_the_wrong_width_are_refused(tiny_model):
    with pytest.raises(ValueError, match="do not fit this model"):
        tiny_model.predict(random_images(1, 3, 16, 16), "depth-test-notext", prompt_embeds=torch.zeros(1, 77, 768))


def test_options_object_and_keyword_settings_agree(tiny_model):
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    options = PredictOptions(steps=2, sampler="oracle", processing_resolution=0)
    # Exact by construction: the same settings reach the same code with the same inputs.
    torch.testing.assert_close(tiny_model.predict(images, "depth-test-notext", options).raw,
                               tiny_model.predict(images, "depth-test-notext", steps=2, sampler="oracle",
                                                  processing_resolution=0).raw, atol=0, rtol=0)


def test_batched_tasks_equal_sequential_tasks(tiny_model):
    """All adapters in one UNet batch (peft's mixed-adapter rows) give the sequential results."""
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(7))
    names = ["depth-test-notext", "normal-test-notext"]
    seen = []
    sequential = tiny_model.predict_tasks(images, names, processing_resolution=0, return_latents=True)
    batched = tiny_model.predict_tasks(images, names, processing_resolution=0, return_latents=True,
                                       task_batching="batched", callback=lambda d, t: seen.append(t))
    assert seen == [5] * 5  # one sampler run serves both tasks
    for name in names:  # per-row unmerged adapters against merged weights: fp32 rounding, ~4e-7 of latents ~1
        torch.testing.assert_close(batched[name].latents, sequential[name].latents, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[names[0]].latents, batched[names[1]].latents)



def test_a_prompt_reaches_prompted_adapters_only(tiny_model, tmp_path):
    """Mixed tasks: the prompted adapter is guided by the prompt, the -notext one runs on the empty prompt."""
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    prompted = tiny_model.load_adapter(tiny_model._adapters["normal-test-notext"].file, name="normal-prompted",
                                       uses_prompts=True)
    assert prompted.uses_prompts
    names = ["depth-test-notext", "normal-prompted"]
    for mode in ("sequential", "batched"):
        mixed = tiny_model.predict_tasks(images, names, processing_resolution=0, return_latents=True,
                                         prompt="a room", task_batching=mode)
        plain = tiny_model.predict(images, names[0], processing_resolution=0, return_latents=True)
        # Batched: other batch rows and per-row adapters, so fp32 rounding (latents ~1); sequential: exact.
        torch.testing.assert_close(mixed[names[0]].latents, plain.latents, atol=1e-5, rtol=1e-5)
        unprompted = tiny_model.predict(images, names[1], processing_resolution=0, return_latents=True)
        assert not torch.allclose(mixed[names[1]].latents, unprompted.latents, atol=1e-4)


def test_prompt_counts_are_checked_against_the_whole_batch_before_any_work(tiny_model):
    images = random_images(8, 3, 16, 16)
    calls = []
    encode = tiny_model.encode
    tiny_model.encode = lambda pixels: calls.append(1) or encode(pixels)
    try:
        with pytest.raises(ValueError, match=r"one prompt or one per image \(8\), got 5"):
            tiny_model.predict(images, "depth-test-notext", batch_size=4, prompt=["a"] * 5)
        with pytest.raises(ValueError, match="prompt_embeds must have 1 or 8 rows, got 4"):
            tiny_model.predict(images, "depth-test-notext", batch_size=4, prompt_embeds=torch.zeros(4, 77, 32))
    finally:
        tiny_model.encode = encode
    assert calls == []


def test_adapter_facts_come_from_its_path_whatever_name_it_is_given(tiny_model):
    info = tiny_model.load_adapter(tiny_model._adapters["depth-test-notext"].file.parent, name="d")
    assert (info.task, info.uses_prompts, info.target_scale) == ("depth", False, 8.0)


def test_scheduler_config_defaults_resolve_as_diffusers_does(tiny_base, tmp_path):
    """A config missing keys gets diffusers' DDIM defaults (clip_sample on!), as the reference would."""
    import json
    import shutil

    folder = tmp_path / "base"
    shutil.copytree(tiny_base, folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    for key in ("clip_sample", "set_alpha_to_one", "steps_offset"):
        config.pop(key)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    model = DMPModel.from_pretrained(folder, device="cpu", precision="fp32")
    assert model.schedule.clip_sample == 1.0 and model.schedule.steps_offset == 0
    assert model.schedule.final_alpha.item() == 1.0
    model.load_adapter(write_official_adapter(model.unet, tmp_path / "depth-q-notext", seed=3, scale=0.5))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    uncond = model.text.empty_embedding()
    model.unet.set_adapter("depth-q-notext")  # the same network on both sides; the schedules are compared
    expected = reference_loop(model.unet, folder, x, 5, "v_prediction", False, uncond)
    ours = model.sample(x, "depth-q-notext")
    torch.testing.assert_close(ours, expected, atol=5e-4, rtol=0)
    unclipped = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    unclipped.load_adapter(tmp_path / "depth-q-notext")
    assert not torch.allclose(unclipped.sample(x, "depth-q-notext"), ours, atol=1e-3)  # clipping mattered
