"""The bridge on every core from 0.3.64 on: newer cores' surfaces where they exist (is_oom,
cuda_device_context, dynamic patchers, get_models, ExecutionBlocker's new home), optional modules
that fail to import, IMAGE batches of any float dtype and layout, non-finite network outputs, and
MODELs carrying patches. Through ComfyUI stand-ins (0.3.64's surfaces, newer ones added per test) on
plain-torch toy models: fast, and no model library needed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from comfy_stubs import core_models, stand_ins
from comfy_stubs.model_files import write_official_adapter

NAMES = ("depth-toy-notext", "normal-toy-notext")
SETTINGS = dict(steps=2, sampler="ddim", spacing="leading", processing_resolution=16, batch_size=4)


def images(seed: int = 0, count: int = 2) -> torch.Tensor:
    return torch.rand(count, 24, 32, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def env(tmp_path):
    """The pack loaded over fresh stand-ins (each test may add newer-core surfaces), with toy models."""
    calls = stand_ins.install(tmp_path)
    model, vae, clip = core_models.toy_core_objects()
    for seed, name in enumerate(NAMES):
        write_official_adapter(model.model.diffusion_model.unet, tmp_path / "models" / "dmp" / name, seed)
    pack = stand_ins.load_pack()
    yield SimpleNamespace(pack=pack, nodes=pack.NODE_CLASS_MAPPINGS, bridge=pack.nodes.comfy_bridge, calls=calls,
                          model=model, vae=vae, clip=clip, management=sys.modules["comfy.model_management"])
    stand_ins.unload_pack(pack)
    stand_ins.uninstall()
    for name in ("comfy.lora_convert", "comfy_execution.graph"):
        sys.modules.pop(name, None)


def load(env, *names, model=None):
    dmp_model = None
    for name in names:
        dmp_model = env.nodes["DMPLoadAdapter"]().load(model or env.model, f"{name}/pytorch_lora_weights.safetensors",
                                                       1.0, dmp_model=dmp_model)[0]
    return dmp_model


def predict(env, dmp_model, image, **settings):
    return env.nodes["DMPPredict"]().predict(dmp_model, env.vae, env.clip, image, "depth", **{**SETTINGS, **settings})


# Out of memory --------------------------------------------------------------------------------------

class FailingDecoder(torch.nn.Module):
    """Wraps a VAE decoder: raises `make_error()` for batches larger than `largest` (None: for every batch)."""

    def __init__(self, inner, make_error, largest):
        super().__init__()
        self.inner, self.make_error, self.largest = inner, make_error, largest
        self.batches: list[int] = []

    def decode(self, z):
        self.batches.append(z.shape[0])
        if self.largest is None or z.shape[0] > self.largest:
            raise self.make_error()
        return self.inner.decode(z)


def accelerator_oom():
    """What newer torch raises for some CUDA allocation failures instead of OutOfMemoryError."""
    return torch.AcceleratorError("CUDA error: out of memory")


def newer_core_is_oom(error) -> bool:
    """Newer cores' model_management.is_oom: OOM_EXCEPTION, or an AcceleratorError saying out of memory."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, torch.AcceleratorError) and "out of memory" in str(error).lower())


@pytest.mark.parametrize("core, make_error", [
    ("0.3.64", lambda: torch.cuda.OutOfMemoryError("CUDA out of memory")),
    ("newer", lambda: torch.cuda.OutOfMemoryError("CUDA out of memory")),
    ("newer", accelerator_oom),
])
def test_whatever_the_core_counts_as_out_of_memory_halves_the_decode_batch(env, core, make_error):
    if core == "newer":
        env.management.is_oom = newer_core_is_oom
    expected = env.vae.first_stage_model.decode(torch.randn(4, 4, 3, 4, generator=torch.Generator().manual_seed(1)))
    env.vae.first_stage_model = FailingDecoder(env.vae.first_stage_model, make_error, largest=1)
    latents = torch.randn(4, 4, 3, 4, generator=torch.Generator().manual_seed(1))
    decoded = env.bridge.vae_decode(env.vae, latents)
    assert env.vae.first_stage_model.batches == [4, 2, 1, 1, 2, 1, 1]  # halved down to single images
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=1e-5)  # per-row convolutions, other batches


def test_a_single_image_out_of_memory_falls_back_to_the_tiled_decode(env, caplog):
    env.management.is_oom = newer_core_is_oom
    tiled = []
    env.vae.decode_tiled = lambda latents: tiled.append(latents.shape) or torch.full((1, 24, 32, 3), 0.5)
    env.vae.first_stage_model = FailingDecoder(env.vae.first_stage_model, accelerator_oom, largest=None)
    with caplog.at_level(logging.WARNING):
        decoded = env.bridge.vae_decode(env.vae, torch.zeros(1, 4, 3, 4))
    assert tiled == [(1, 4, 3, 4)] and "tiled VAE decode" in caplog.text
    assert decoded.dtype == torch.float32 and decoded.shape == (1, 3, 24, 32)
    assert torch.equal(decoded, torch.zeros(1, 3, 24, 32))  # 0.5 * 2 - 1, exact


@pytest.mark.parametrize("core", ["0.3.64", "newer"])
def test_other_errors_propagate_unchanged(env, core):
    if core == "newer":
        env.management.is_oom = newer_core_is_oom
    failure = RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")
    env.vae.first_stage_model = FailingDecoder(env.vae.first_stage_model, lambda: failure, largest=None)
    with pytest.raises(RuntimeError) as raised:
        env.bridge.vae_decode(env.vae, torch.zeros(2, 4, 3, 4))
    assert raised.value is failure and env.vae.first_stage_model.batches == [2]  # no retry, no halving


def test_an_accelerator_error_that_is_not_out_of_memory_is_not_retried(env):
    env.management.is_oom = newer_core_is_oom
    failure = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    env.vae.first_stage_model = FailingDecoder(env.vae.first_stage_model, lambda: failure, largest=None)
    with pytest.raises(torch.AcceleratorError) as raised:
        env.bridge.vae_decode(env.vae, torch.zeros(2, 4, 3, 4))
    assert raised.value is failure


def test_without_is_oom_an_accelerator_error_is_not_taken_for_out_of_memory(env):
    """0.3.64 knows only OOM_EXCEPTION: the bridge does not guess from messages where the core does not."""
    assert not hasattr(env.management, "is_oom")
    assert env.bridge.is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert not env.bridge.is_out_of_memory(accelerator_oom())


# Optional imports --------------------------------------------------------------------------------

def reload_pack(env):
    stand_ins.unload_pack(env.pack)
    env.pack = stand_ins.load_pack()
    env.nodes, env.bridge = env.pack.NODE_CLASS_MAPPINGS, env.pack.nodes.comfy_bridge


def test_lora_convert_is_used_where_it_imports(env):
    converted = []
    module = types.ModuleType("comfy.lora_convert")
    module.convert_lora = lambda lora: converted.append(len(lora)) or lora
    sys.modules["comfy.lora_convert"] = module
    reload_pack(env)
    assert predict(env, load(env, NAMES[0]), images())[1].raw.shape == (2, 24, 32)
    assert len(converted) == 1 and converted[0] > 0


@pytest.mark.parametrize("missing", ["module", "function"])
def test_predict_works_when_lora_convert_fails_to_import(env, missing):
    """A module that is gone raises ModuleNotFoundError; a function moved out of a module that is still there
    raises a plain ImportError. Either way the pack loads and predicts."""
    if missing == "module":
        sys.modules["comfy.lora_convert"] = None  # import raises ModuleNotFoundError
    else:
        sys.modules["comfy.lora_convert"] = types.ModuleType("comfy.lora_convert")  # no convert_lora
    reload_pack(env)
    assert env.bridge.convert_lora is None
    assert predict(env, load(env, NAMES[0]), images())[1].raw.shape == (2, 24, 32)


@pytest.mark.parametrize("home", ["comfy_execution.graph_utils", "comfy_execution.graph", None])
def test_blocked_outputs_use_the_execution_blocker_wherever_the_core_keeps_it(env, home):
    utils = sys.modules["comfy_execution.graph_utils"]
    del utils.ExecutionBlocker  # moved away, or gone
    if home is not None:
        holder = sys.modules.setdefault(home, types.ModuleType(home))
        holder.ExecutionBlocker = stand_ins.ExecutionBlocker
    outputs = predict(env, load(env, NAMES[0]), images())
    if home is None:  # a core without it: the outputs are None, the prediction itself works
        assert outputs[2] is None and outputs[3] is None
    else:
        assert isinstance(outputs[2], stand_ins.ExecutionBlocker) and "ensemble" in outputs[2].message
    assert outputs[1].raw.shape == (2, 24, 32)


# IMAGE batches of any float dtype and layout --------------------------------------------------------

def test_fp16_and_non_contiguous_images_give_the_float32_result(env):
    dmp_model = load(env, NAMES[0])
    image = images().half()                               # what --fp16-intermediates hands over
    reference = predict(env, dmp_model, image.float().contiguous())
    strided = image.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not strided.is_contiguous()
    for variant in (image, strided):
        visual, prediction, *_ = predict(env, dmp_model, variant)
        torch.testing.assert_close(prediction.raw, reference[1].raw, atol=1e-5, rtol=1e-5)
        assert visual.dtype == torch.float32 and visual.device.type == "cpu" and visual.is_contiguous()


def test_integer_images_are_refused_naming_the_dtype(env):
    with pytest.raises(ValueError, match="floats in \\[0, 1\\].*uint8"):
        predict(env, load(env, NAMES[0]), (images() * 255).to(torch.uint8))


# Models and the UNet call ------------------------------------------------------------------------------

def test_the_dmp_model_exposes_its_model_clones_to_core(env):
    dmp_model = load(env, *NAMES)
    models = dmp_model.get_models()
    assert models == [adapter.model for adapter in dmp_model.adapters] and len(models) == 2
    assert all(m is not env.model and m.model is env.model.model for m in models)  # clones on the one base


def record_unet_calls(base, context_depth) -> list:
    """[(transformer_options, device contexts open)] of every call of the UNet, which then writes into the
    dict it got, as core's UNet does (block indices)."""
    seen = []

    def record(module, args, kwargs):
        options = kwargs.get("transformer_options")
        seen.append((options, context_depth[0]))
        if options is not None:
            options["block"] = ("input", 0)

    base.diffusion_model.register_forward_pre_hook(record, with_kwargs=True)
    return seen


class DynamicPatcher(core_models.ModelPatcher):
    """A newer core's ModelPatcherDynamic, as far as DMP can tell: is_dynamic() and its own memory estimate."""

    def is_dynamic(self):
        return True

    def memory_required(self, input_shape):
        return 12345

    def clone(self):
        other = DynamicPatcher(self.model, self.load_device)
        other.patches = {k: list(v) for k, v in self.patches.items()}
        return other


@pytest.mark.parametrize("core", ["0.3.64", "newer"])
def test_every_unet_call_gets_its_own_options_inside_the_device_context(env, core):
    depth = [0]
    entered = []
    if core == "newer":
        @contextlib.contextmanager
        def cuda_device_context(device):
            entered.append(device)
            depth[0] += 1
            yield
            depth[0] -= 1

        env.management.cuda_device_context = cuda_device_context
        model = DynamicPatcher(env.model.model)
    else:
        model = env.model
    seen = record_unet_calls(model.model, depth)
    env.calls.memory_required.clear()
    predict(env, load(env, NAMES[0], model=model), images(), steps=3)
    options = [options for options, _ in seen]
    assert len(options) == 3 and all(isinstance(o, dict) for o in options)
    assert len({id(o) for o in options}) == 3  # a new dict per call (all three are still alive here)
    if core == "newer":
        assert all(o["prefetch_dynamic_vbars"] is True for o in options)
        assert all(inside == 1 for _, inside in seen) and len(entered) >= 3
        assert 12345 in env.calls.memory_required  # the patcher's own estimate
    else:
        assert all("prefetch_dynamic_vbars" not in o for o in options)
        assert 12345 not in env.calls.memory_required


# Non-finite values ------------------------------------------------------------------------------------

def test_nan_from_the_decoder_stops_with_the_stage_and_what_to_try(env):
    decode = env.vae.first_stage_model.decode
    env.vae.first_stage_model.decode = lambda z: decode(z) * float("nan")
    with pytest.raises(RuntimeError, match="VAE decoder gave NaN.*--fp32-vae"):
        predict(env, load(env, NAMES[0]), images())


def test_infinity_from_the_unet_stops_with_the_stage_and_what_to_try(env):
    env.model.model.diffusion_model.register_forward_hook(lambda module, args, output: output * float("inf"))
    dmp_model = load(env, NAMES[0])
    with pytest.raises(RuntimeError, match="UNet \\(step at t=\\d+\\) gave NaN or infinite.*dynamic-vram"):
        predict(env, dmp_model, images())


# MODELs carrying patches ---------------------------------------------------------------------------------

def test_a_model_with_a_chained_lora_is_warned_about(env, caplog):
    chained = env.model.clone()
    key = next(k for k in chained.model.state_dict() if k.endswith("to_q.weight"))
    chained.add_patches({key: core_models.LoRAAdapter((torch.zeros(8, 1), torch.zeros(1, 8), None, None, None,
                                                       None))}, 1.0)
    with caplog.at_level(logging.WARNING):
        load(env, NAMES[0], model=chained)
    assert "weight patches on 1 weights" in caplog.text and "checkpoint loader's MODEL" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load(env, NAMES[0])  # the plain MODEL: nothing to say
    assert "DMP:" not in caplog.text


def test_attention_patches_and_wrappers_are_not_applied_and_are_named(env, caplog):
    patched = env.model.clone()
    patch = object()
    patched.model_options = {"transformer_options": {"patches": {"attn1_patch": [patch]}},
                             "sampler_cfg_function": lambda args: args["cond"]}
    with caplog.at_level(logging.WARNING):
        dmp_model = load(env, NAMES[0], model=patched)
    assert "sampler_cfg_function" in caplog.text and "transformer_options['patches']" in caplog.text
    seen = record_unet_calls(patched.model, [0])
    predict(env, dmp_model, images())
    assert seen and all("patches" not in options for options, _ in seen)
