"""An adapter running alone is merged into the UNet's weights, and unmerged exactly (denoiser.MergedLora)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from dmp_model import DMPModel
from dmp_model.sampling import get_timesteps, sample_dmp
from dmp_model.sd.denoiser import AdapterDenoiser, MergedLora
from factories import write_official_adapter

NAMES = ("depth-a-notext", "normal-b-notext")


@pytest.fixture()
def model(tiny_base, tmp_path) -> DMPModel:
    """A fresh model with two adapters (this file switches, merges and moves it)."""
    model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    for seed, name in enumerate(NAMES, start=1):
        model.load_adapter(write_official_adapter(model.unet, tmp_path / name, seed=seed, scale=0.3))
    return model


def base_weights(unet) -> dict[str, torch.Tensor]:
    """Copies of the weights under the LoRA layers, read directly (not through state_dict)."""
    return {name: m.get_base_layer().weight.detach().clone()
            for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


def merged_layers(unet) -> list[str]:
    return [name for name, m in unet.named_modules() if isinstance(m, LoraLayer) and m.merged]


def unmerged_sample(model: DMPModel, x: torch.Tensor, name: str, steps: int = 3) -> torch.Tensor:
    """The sampler on peft's unmerged LoRA layers (the path before merging existed)."""
    model.unmerge_adapter()
    model.unet.set_adapter(name)
    context = model.empty_embedding().expand(x.shape[0], -1, -1)
    return sample_dmp(AdapterDenoiser(model.unet, context), x, get_timesteps(steps), model.schedule)


def lora_module(seed: int = 0) -> torch.nn.Module:
    """Four Linear layers carrying two random LoRA adapters, 'a' and 'b' (peft, as on the UNet)."""
    from peft import inject_adapter_in_model

    generator = torch.Generator().manual_seed(seed)
    module = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(4)))
    for name in ("a", "b"):
        module = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1", "2", "3"]),
                                         module, adapter_name=name)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return module


def test_a_thousand_switches_leave_the_weights_bit_identical():
    module = lora_module()
    layers = [m for m in module.modules() if isinstance(m, LoraLayer)]
    original = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    merger = MergedLora(module)
    for i in range(1000):
        assert merger.merge("ab"[i % 2])
    for layer, weight in zip(layers, original):  # 'b' is merged: W + (alpha / r) up @ down
        update = 2 * layer.lora_B["b"].weight @ layer.lora_A["b"].weight
        # peft's get_delta_weight may order the 4-term sums otherwise: a few ulps of values up to ~30.
        torch.testing.assert_close(layer.get_base_layer().weight, weight + update, atol=1e-5, rtol=1e-5)
    assert merger.extra_bytes == 4 * 64 * 64 * 4  # the memory cost: one copy of the adapted weights
    assert all(layer.forward == layer.get_base_layer().forward for layer in layers)  # peft's checks skipped
    merger.unmerge()
    assert merger.extra_bytes == 0 and not any(layer.merged for layer in layers)
    assert not any("forward" in layer.__dict__ for layer in layers)  # peft's forward is back
    # Bit for bit by construction: unmerge puts back the very tensors merge kept (no arithmetic at all).
    assert all(torch.equal(layer.get_base_layer().weight, w) for layer, w in zip(layers, original))
    # The test can fail: peft's own unmerge (W + u - u, rounded twice) drifts. Made certain on every machine:
    # integer LoRA factors make each update u an exact small integer whatever the BLAS sums in which order,
    # so only IEEE round-to-nearest-even acts, and one planted weight W = 1 + 2^-23 with u = 2 must come back
    # as 1: W + 2 = 3 + 2^-23 lies halfway between 3 and 3 + 2^-22 and rounds to the even 3 (then 3 - 2 = 1).
    drifting = lora_module()
    drifting_layers = [m for m in drifting.modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        for name, parameter in drifting.named_parameters():
            if "lora_" in name:
                parameter.round_()
        witness = drifting_layers[0]
        witness.lora_A["a"].weight[:, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        witness.lora_B["a"].weight[0, :] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # u[0, 0] = alpha / r * 1 * 1 = 2
        witness.get_base_layer().weight[0, 0] = 1 + 2**-23
    before = [layer.get_base_layer().weight.detach().clone() for layer in drifting_layers]
    for i in range(1000):
        for layer in drifting_layers:
            layer.merge(adapter_names=["ab"[i % 2]])
            layer.unmerge()
    assert witness.get_base_layer().weight[0, 0].item() == 1.0
    assert not all(torch.equal(layer.get_base_layer().weight, w) for layer, w in zip(drifting_layers, before))


@pytest.mark.parametrize("switches", [pytest.param(1000, marks=pytest.mark.slow), 20])
def test_switching_adapters_in_predict_leaves_the_unet_weights_bit_identical(model, switches):
    original = base_weights(model.unet)
    context = model.empty_embedding()
    for i in range(switches):
        model.denoiser([NAMES[i % 2]], context, None)  # what predict does per chunk
    merged = base_weights(model.unet)
    assert len(merged_layers(model.unet)) == len(original)
    assert any(not torch.equal(merged[k], original[k]) for k in original)  # updates of ~0.1 on weights of ~0.1
    extra = sum(w.numel() * w.element_size() for w in original.values())
    assert model._merged.extra_bytes == extra
    model.unmerge_adapter()
    assert not merged_layers(model.unet) and model._merged.extra_bytes == 0
    for key, weight in base_weights(model.unet).items():  # the kept tensors put back: exact by construction
        assert torch.equal(weight, original[key]), key


def test_merged_predictions_equal_the_unmerged_peft_path(model):
    x = model.encode(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    for name in NAMES:
        merged = model.sample(x, name, steps=3)
        assert merged_layers(model.unet)  # the fast path really ran
        # Different arithmetic ((W + BA) x against W x + B (A x)): fp32 rounding, amplified by 3 UNet calls,
        # about 1e-6 on latents of magnitude ~1; an adapter missing or wrong moves them by ~0.5 (below).
        torch.testing.assert_close(merged, unmerged_sample(model, x, name), atol=1e-5, rtol=1e-5)
    a, b = (model.sample(x, name, steps=3) for name in NAMES)
    assert not torch.allclose(a, b, atol=1e-3)  # the adapters differ, so switching is visible


def test_nothing_outside_sees_or_saves_merged_weights(model, tmp_path):
    original = base_weights(model.unet)
    images = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    expected = model.predict(images, NAMES[0], steps=2, processing_resolution=0).raw
    saved = model.unet.state_dict()  # reading the state dict unmerges first
    assert not merged_layers(model.unet)
    for name, weight in original.items():
        assert torch.equal(saved[f"{name}.base_layer.weight"], weight)
    model.predict(images, NAMES[0], steps=2, processing_resolution=0)
    model.load_adapter(write_official_adapter(model.unet, tmp_path / "depth-c-notext", seed=3))
    assert not merged_layers(model.unet)
    model.predict(images, NAMES[0], steps=2, processing_resolution=0)
    model.remove_adapter("depth-c-notext")
    model.to("cpu")
    assert not merged_layers(model.unet)
    both = model.predict_tasks(images, NAMES, steps=2, processing_resolution=0, task_batching="batched")
    assert not merged_layers(model.unet)  # several adapters in one batch run unmerged
    # Unmerged per-row adapters against merged weights: rounding differences only (about 2e-6 of the depth
    # scale, decoded metres up to ~8), so 1e-4 of the scale; a wrong adapter moves it by far more.
    scale = float(expected.abs().max())
    torch.testing.assert_close(both[NAMES[0]].raw, expected, atol=1e-4 * scale, rtol=0)
    model.predict(images, NAMES[1], steps=2, processing_resolution=0)
    model.unet.load_state_dict(saved)  # loading weights while merged: the loaded ones stay
    assert not merged_layers(model.unet)
    for key, weight in base_weights(model.unet).items():  # copies of the kept originals: exact
        assert torch.equal(weight, original[key]), key


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_a_registered_live_adapter_is_merged_for_one_call_only(model):
    """A trainer's adapter: predictions follow its weights, training steps see the unmerged LoRA layers."""
    original = base_weights(model.unet)
    model.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                           adapter_name="live")
    model.register_adapter("live", model.adapters[NAMES[0]])
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    seen = []
    model.predict(images, "live", steps=2, processing_resolution=0,
                  callback=lambda done, total: seen.append(bool(merged_layers(model.unet))))
    assert seen == [True, True] and not merged_layers(model.unet)
    for key, weight in base_weights(model.unet).items():  # the kept tensors put back: exact by construction
        assert torch.equal(weight, original[key]), key
    generator = torch.Generator().manual_seed(3)  # lora_A too: peft drew it from the global random state
    for name, parameter in model.unet.named_parameters():  # a training step changes the live weights
        if "lora_A.live" in name or "lora_B.live" in name:
            parameter.data.normal_(0, 0.05, generator=generator)
    x = model.encode(images)
    # Merged against unmerged arithmetic: rounding only (see test_merged_predictions_equal_the_unmerged_peft_path).
    torch.testing.assert_close(model.sample(x, "live", steps=3), unmerged_sample(model, x, "live"), atol=1e-5,
                               rtol=1e-5)
    # Gradients reach every adapted projection. A 16 x 16 latent keeps at least 2 x 2 = 4 tokens in every
    # attention (the tiny UNet downsamples 3 times: 16, 8, 4 and 2 px in the mid block); on a 2 x 2 latent
    # the mid block sees one token, where softmax attention is 1 whatever the query and key, so to_q and
    # to_k gradients there are 0 by mathematics (and come out as 0.0 or 1e-13, by the machine's rounding).
    # With several tokens (and, for attn2, the 77 distinct context tokens of the empty prompt) each lora_A
    # gradient is lora_B^T (dL/d output) x^T with lora_B random (above) and random inputs: non-zero by
    # mathematics, the smallest ~4e-5 of the largest, where a mathematically zero one comes out at rounding
    # level (~1e-11 of it on the 2 x 2 latent), so 1e-6 of the largest separates them with room both ways.
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    model.unet(z, 1, encoder_hidden_states=model.empty_embedding()).sample.square().mean().backward()
    grads = {n: p.grad for n, p in model.unet.named_parameters() if "lora_A.live" in n}
    assert len(grads) == 16 * 2 * 4  # 16 transformer blocks x (attn1, attn2) x 4 projections
    assert all(g is not None for g in grads.values())
    scale = max(float(g.abs().max()) for g in grads.values())
    small = {n: float(g.abs().max()) for n, g in grads.items() if g.abs().max() <= 1e-6 * scale}
    assert not small, small
