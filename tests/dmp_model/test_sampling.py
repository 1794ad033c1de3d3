"""The sampler's formulas against the method page and against diffusers' own DDIM scheduler."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dmp_model.sampling import (
    PREDICTION_TYPES,
    SD1_SCHEDULER_CONFIG,
    Schedule,
    apply_guidance,
    get_timesteps,
    interpolate,
    max_steps,
    sample_dmp,
    sd1_schedule,
    split_prediction,
    training_target,
    velocity,
)

SCHEDULER_CONFIG = SD1_SCHEDULER_CONFIG
SCHEDULE = sd1_schedule()
ALPHAS = SCHEDULE.alphas_cumprod
A0 = ALPHAS[0]


def latents(seed, shape=(2, 4, 6, 5)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_schedule_constants_are_sd1():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    # Exact by construction: the schedule is built by these very operations (diffusers' arithmetic).
    assert torch.equal(ALPHAS, torch.cumprod(1 - betas, 0))
    assert A0.item() == pytest.approx(0.99915, abs=1e-6)


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DDPMScheduler])
def test_sd1_schedule_is_diffusers_bit_for_bit(scheduler_class):
    """The one home of SD 1.x's schedule against diffusers' schedulers built from the same release config."""
    scheduler = scheduler_class.from_config(SD1_SCHEDULER_CONFIG)
    assert torch.equal(ALPHAS, scheduler.alphas_cumprod)
    assert (SCHEDULE.steps_offset, SCHEDULE.clip_sample) == (1, None)
    if scheduler_class is DDIMScheduler:
        assert torch.equal(SCHEDULE.final_alpha, scheduler.final_alpha_cumprod)


def test_five_leading_steps_are_the_references():
    assert get_timesteps(5) == [801, 601, 401, 201, 1]
    assert get_timesteps(10)[0] == 901 and get_timesteps(10)[-1] == 1
    assert get_timesteps(1) == [1]
    assert get_timesteps(1, "trailing") == [999]
    assert get_timesteps(5, "trailing") == [999, 799, 599, 399, 199]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 7, 10, 50, 999])
def test_timesteps_equal_diffusers(spacing, steps):
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    assert get_timesteps(steps, spacing) == scheduler.timesteps.tolist()


@pytest.mark.parametrize("bad", [0, -3, 1001])
def test_steps_out_of_range_raise(bad):
    with pytest.raises(ValueError, match=rf"steps must be an integer in \[1, 1000\], got {bad}"):
        get_timesteps(bad, "trailing")


def test_1000_leading_steps_would_start_past_the_schedule_and_are_refused():
    """diffusers gives t = 1000 here and then fails indexing alphas_cumprod: refuse up front."""
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 999\], got 1000"):
        get_timesteps(1000)
    assert max_steps("leading") == 999 and max_steps("leading", steps_offset=0) == 1000
    assert get_timesteps(1000, "trailing")[0] == 999 and get_timesteps(1000, "trailing")[-1] == 0


@pytest.mark.parametrize("steps, spacing", [(999, "leading"), (1000, "trailing")])
def test_the_longest_schedules_run(steps, spacing):
    out = sample_dmp(fake_model(1), latents(1, (1, 4, 2, 2)), get_timesteps(steps, spacing), SCHEDULE)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [2.5, "5", None, True])
def test_steps_not_an_integer_raise(bad):
    with pytest.raises(TypeError, match="steps must be an integer"):
        get_timesteps(bad)


def test_unknown_spacing_raises():
    with pytest.raises(ValueError, match="spacing must be one of"):
        get_timesteps(5, "linspace")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_training_target_is_inverted_exactly_on_the_path(prediction_type):
    """On z_t = interpolate(y, x, a), the training target gives back y and x (standard DDIM)."""
    y, x = latents(1), latents(2)
    for t in (1, 250, 801, 999):
        alpha = ALPHAS[t]
        z = interpolate(y, x, alpha)
        y_hat, x_hat = split_prediction(training_target(prediction_type, y, x, alpha), z, alpha, prediction_type)
        torch.testing.assert_close(y_hat, y, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(x_hat, x, atol=2e-4, rtol=1e-4)


def test_velocity_matches_diffusers_get_velocity():
    """DMP's v is diffusers' velocity with the input latent in the place of the noise."""
    y, x, t = latents(1), latents(2), torch.tensor([801, 5])
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    expected = scheduler.get_velocity(y, x, t)
    alpha = ALPHAS[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(velocity(y, x, alpha), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(interpolate(y, x, alpha), scheduler.add_noise(y, x, t), atol=1e-6, rtol=1e-6)


def fake_model(seed):
    """A deterministic stand-in network: a fixed nonlinear function of (z, t)."""
    weight = latents(seed, (4, 4)) * 0.3

    def model(z, t):
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight, z)) + t / 1000
    return model


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 50])
def test_standard_sampler_equals_diffusers_ddim(prediction_type, spacing, steps):
    """The 'ddim' sampler is diffusers' DDIMScheduler.step (eta 0), as in the reference."""
    x, model = latents(3), fake_model(4)
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG, prediction_type=prediction_type,
                                          timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    z = x
    for t in scheduler.timesteps:
        z = scheduler.step(model(z, int(t)), t, z).prev_sample
    ours = sample_dmp(model, x, get_timesteps(steps, spacing), SCHEDULE, prediction_type)
    torch.testing.assert_close(ours, z, atol=1e-5, rtol=1e-5)


def reference_oracle(model, x, timesteps, prediction_type):
    """The reference's oracle DDIM written out from the method page (pred_epsilon := input latent)."""
    ratio = 1000 // len(timesteps)
    z = x
    for t in timesteps:
        a = ALPHAS[t]
        a_prev = ALPHAS[t - ratio] if t - ratio >= 0 else A0
        out = model(z, t)
        if prediction_type == "v_prediction":
            y_hat, x_hat = a**0.5 * z - (1 - a) ** 0.5 * out, x
        elif prediction_type == "sample":
            y_hat, x_hat = out, x
        else:  # the reference keeps an epsilon model's own x estimate
            y_hat, x_hat = (z - (1 - a) ** 0.5 * out) / a**0.5, out
        z = a_prev**0.5 * y_hat + (1 - a_prev) ** 0.5 * x_hat
    return z


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 50])
def test_oracle_sampler_follows_the_method(prediction_type, steps):
    x, model = latents(5), fake_model(6)
    timesteps = get_timesteps(steps)
    ours = sample_dmp(model, x, timesteps, SCHEDULE, prediction_type, oracle=True)
    torch.testing.assert_close(ours, reference_oracle(model, x, timesteps, prediction_type), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 50])
def test_oracle_with_a_perfect_model_lands_on_the_method_formula(spacing, steps):
    """A model that always recovers y gives sqrt(a0) y + sqrt(1 - a0) x: DMP's 0.029 * x residue."""
    y, x = latents(7), latents(8)

    def perfect(z, t):  # the v that makes y_hat = y at this z
        a = ALPHAS[t]
        return (a**0.5 * z - y) / (1 - a) ** 0.5

    out = sample_dmp(perfect, x, get_timesteps(steps, spacing), SCHEDULE, "v_prediction", oracle=True)
    torch.testing.assert_close(out, A0**0.5 * y + (1 - A0) ** 0.5 * x, atol=1e-5, rtol=1e-5)
    assert (1 - A0) ** 0.5 == pytest.approx(0.029, abs=5e-4)


def test_perfect_model_standard_sampler_keeps_the_first_implied_input():
    """Standard DDIM carries the input estimate implied at the first step through the chain."""
    y, x = latents(9), latents(10)

    def perfect(z, t):
        a = ALPHAS[t]
        return (a**0.5 * z - y) / (1 - a) ** 0.5

    timesteps = get_timesteps(5)
    a_first = ALPHAS[timesteps[0]]
    implied_x = (x - a_first**0.5 * y) / (1 - a_first) ** 0.5
    out = sample_dmp(perfect, x, timesteps, SCHEDULE, "v_prediction")
    torch.testing.assert_close(out, A0**0.5 * y + (1 - A0) ** 0.5 * implied_x, atol=1e-4, rtol=1e-4)


def test_final_output_y_hat_returns_the_last_estimate():
    y, x = latents(11), latents(12)

    def perfect(z, t):
        a = ALPHAS[t]
        return (a**0.5 * z - y) / (1 - a) ** 0.5

    out = sample_dmp(perfect, x, get_timesteps(5), SCHEDULE, "v_prediction", oracle=True, final_output="y_hat")
    torch.testing.assert_close(out, y, atol=1e-5, rtol=1e-5)


def test_guidance_combines_cond_then_uncond():
    cond, uncond = latents(13), latents(14)
    torch.testing.assert_close(apply_guidance(torch.cat([cond, uncond]), 2.0), uncond + 2 * (cond - uncond))
    torch.testing.assert_close(apply_guidance(torch.cat([cond, uncond]), 1.0), cond)


def test_callback_sees_every_step_and_can_interrupt():
    seen = []
    sample_dmp(fake_model(1), latents(1), get_timesteps(5), SCHEDULE, callback=lambda i, n, z: seen.append((i, n)))
    assert seen == [(i, 5) for i in range(5)]

    def stop(i, n, z):
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_dmp(fake_model(1), latents(1), get_timesteps(5), SCHEDULE, callback=stop)


def test_unknown_prediction_type_and_final_output_raise():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        sample_dmp(fake_model(1), latents(1), [1], SCHEDULE, "x0")
    with pytest.raises(ValueError, match="final_output must be one of"):
        sample_dmp(fake_model(1), latents(1), [1], SCHEDULE, final_output="last")


def test_clip_sample_clamps_the_estimate_of_y_only():
    x = latents(15) * 5
    model = fake_model(16)
    scheduler = DDIMScheduler.from_config({**SCHEDULER_CONFIG, "clip_sample": True})
    scheduler.set_timesteps(5)
    z = x
    for t in scheduler.timesteps:
        z = scheduler.step(model(z, int(t)), t, z).prev_sample
    ours = sample_dmp(model, x, get_timesteps(5), Schedule(ALPHAS, A0, 1, clip_sample=1.0))
    torch.testing.assert_close(ours, z, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, sample_dmp(model, x, get_timesteps(5), SCHEDULE), atol=1e-3)
