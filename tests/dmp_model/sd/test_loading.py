"""Loading an SD 1.x base: diffusers folders, single-file LDM checkpoints, offline, and every refusal.

The single files are the tiny base written back in the original CompVis layout (tests/support/ldm_layout.py),
so a single-file load must give exactly the model the diffusers folder gives.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

from dmp_model import DMPModel
from dmp_model.io.weight_files import CheckpointError
from dmp_model.sd.loading import PRECISIONS, load_base, resolve_device, resolve_dtype
from factories import write_official_adapter
from ldm_layout import ldm_state_dict, write_single_file
from weight_keys import DMP_LORA, FOUND, INPAINTING, SD2, SDXL, VAE_ONLY, Payload, write_keys

ROOT = Path(__file__).resolve().parents[3]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def components(tiny_base):
    """(unet, vae, text_encoder) read from the tiny diffusers folder, independently of our loader."""
    return (UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").eval(),
            AutoencoderKL.from_pretrained(tiny_base, subfolder="vae").eval(),
            CLIPTextModel.from_pretrained(tiny_base, subfolder="text_encoder").eval())


@pytest.fixture(scope="module")
def single_files(components, tmp_path_factory) -> dict[str, Path]:
    """The tiny base as one original-layout checkpoint: {"safetensors": path, "ckpt": path}."""
    folder = tmp_path_factory.mktemp("single")
    return {"safetensors": write_single_file(folder / "tiny-sd1.safetensors", *components),
            "ckpt": write_single_file(folder / "tiny-sd1.ckpt", *components, ckpt_extra={"global_step": 840000})}


@pytest.fixture(scope="module")
def adapters(components, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("loading-adapters")
    return [write_official_adapter(components[0], folder / "depth-l-notext", seed=31),
            write_official_adapter(components[0], folder / "normal-l-notext", seed=32)]


@pytest.fixture(scope="module")
def folder_model(tiny_base, adapters):
    return DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32", adapters=adapters)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Bit for bit: both hold copies of the same stored tensors (renamed and reshaped, never computed)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=0, rtol=0, msg=key)


def predict_both(model, seed=0):
    images = torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(seed))
    return model.predict_tasks(images, ["depth-l-notext", "normal-l-notext"], processing_resolution=0,
                               return_latents=True)


# ---------------------------------------------------------------------------------------------
# Diffusers folders


def test_folder_loads_frozen_in_eval_mode_with_lazy_text_encoder(tiny_base, components):
    base = load_base(tiny_base, device="cpu", precision="fp32")
    assert base.dtype == torch.float32 and base.device == torch.device("cpu") and base.source == tiny_base
    for model, reference in ((base.unet, components[0]), (base.vae, components[1])):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert_same_weights(model, reference)
    assert base.scheduler_config["beta_schedule"] == "scaled_linear" and base.scheduler_config["steps_offset"] == 1
    assert isinstance(base.load_text_encoder(), CLIPTextModel)


def test_bf16_loads_in_bf16_and_predicts(tiny_base, adapters):
    model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="bf16", adapters=adapters[:1])
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.bfloat16}
    assert model.text.empty_embedding().dtype == torch.bfloat16
    raw = model.predict(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                        processing_resolution=0).raw
    assert raw.shape == (1, 16, 16) and torch.isfinite(raw).all()


def test_fp16_on_the_cpu_falls_back_to_fp32_with_a_warning(tiny_base):
    with pytest.warns(UserWarning, match="fp16 is not supported .* on the CPU; using fp32"):
        model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp16")
    assert model.dtype == torch.float32 and {p.dtype for p in model.unet.parameters()} == {torch.float32}


def test_auto_precision_is_fp32_on_the_cpu_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize("precision", ["fp8", "float32", "", None])
def test_bad_precision_lists_the_choices(tiny_base, precision):
    with pytest.raises(ValueError, match=re.escape(f"precision must be one of {PRECISIONS!r}, got {precision!r}")):
        DMPModel.from_pretrained(tiny_base, device="cpu", precision=precision)


@NO_CUDA
def test_cuda_when_unavailable_is_a_clear_error(tiny_base):
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(ValueError, match="CUDA is not available; use device='cpu'"):
            DMPModel.from_pretrained(tiny_base, device=device, precision="fp32")
    assert resolve_device("auto").type in ("cpu", "mps")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", 3.5])
def test_unknown_device_names_the_accepted_ones(device):
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"):
        resolve_device(device)


def config_folder(tmp_path: Path, tiny_base: Path, unet_changes: dict | None = None, drop: str | None = None,
                  index_changes: dict | None = None, transformer: bool = False) -> Path:
    """A copy of the tiny base's JSON files (no weights: the checks must come before any loading)."""
    folder = tmp_path / "variant"
    for source in tiny_base.rglob("*.json"):
        target = folder / source.relative_to(tiny_base)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    unet_config = folder / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), **(unet_changes or {})}))
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), **(index_changes or {})}))
    if transformer:
        (folder / "transformer").mkdir()
        (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    if drop:
        (folder / drop).unlink()
    return folder


@pytest.mark.parametrize("variant, message", [
    ({"drop": "unet/config.json"}, "unet/config.json is missing"),
    ({"drop": "vae/config.json"}, "vae/config.json is missing"),
    ({"unet_changes": {"in_channels": 9}}, "takes 9 input channels .*inpainting"),
    ({"unet_changes": {"cross_attention_dim": 1024}}, "cross-attention width is 1024 .*not SD 1.x's 768"),
    ({"unet_changes": {"addition_embed_type": "text_time"}}, "SDXL's added conditioning"),
    ({"unet_changes": {"_class_name": "UNet2DModel"}}, "its UNet is a UNet2DModel"),
    ({"transformer": True, "index_changes": {"_class_name": "StableDiffusion3Pipeline"}},
     "holds StableDiffusion3Pipeline; DMP needs Stable Diffusion 1.x"),
    ({"transformer": True, "index_changes": {"_class_name": ""}}, "transformer-based model .*DMP needs"),
    ({"index_changes": {"_class_name": "StableDiffusionXLPipeline"}}, "holds StableDiffusionXLPipeline"),
])
def test_diffusers_folders_that_are_not_sd1_are_refused(tmp_path, tiny_base, variant, message):
    folder = config_folder(tmp_path, tiny_base, **variant)
    with pytest.raises(CheckpointError, match=message) as caught:
        DMPModel.from_pretrained(folder, device="cpu", precision="fp32")
    assert str(folder) in str(caught.value)


def test_an_empty_folder_says_what_a_diffusers_folder_holds(tmp_path):
    with pytest.raises(CheckpointError, match="expected unet/, vae/, text_encoder/, scheduler/ subfolders"):
        DMPModel.from_pretrained(tmp_path, device="cpu")


def test_a_folder_without_text_encoder_loads_and_fails_only_when_the_embedding_is_needed(tmp_path, tiny_base):
    folder = tmp_path / "no-text"
    shutil.copytree(tiny_base, folder, ignore=shutil.ignore_patterns("text_encoder"))
    model = DMPModel.from_pretrained(folder, device="cpu", precision="fp32")
    with pytest.raises(CheckpointError, match="no text_encoder/ subfolder"):
        model.text.empty_embedding()


def test_missing_path_and_tokenizer_folder_without_vocab(tmp_path, tiny_base):
    with pytest.raises(FileNotFoundError, match="base model not found"):
        DMPModel.from_pretrained(tmp_path / "absent.safetensors", device="cpu")
    with pytest.raises(FileNotFoundError, match="has no vocab.json"):
        DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32", tokenizer=tmp_path)


# ---------------------------------------------------------------------------------------------
# Single-file checkpoints


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_single_file_equals_the_diffusers_folder(single_files, tiny_base, folder_model, adapters, fmt):
    model = DMPModel.from_pretrained(single_files[fmt], device="cpu", precision="fp32", config=tiny_base,
                                     adapters=adapters)
    assert_same_weights(model.unet, folder_model.unet)  # base and adapter weights alike
    assert_same_weights(model.vae, folder_model.vae)
    assert model.scheduler_config == folder_model.scheduler_config
    assert model.text.text_encoder is None  # lazy: not loaded with the base
    # Equal weights, possibly at other addresses (see below): a few ulps of values up to ~4 (1 ulp: 2.4e-7).
    torch.testing.assert_close(model.text.empty_embedding(), folder_model.text.empty_embedding(), atol=1e-5, rtol=0)
    assert model.text.text_encoder is None  # released again once the embedding is known
    ours, theirs = predict_both(model), predict_both(folder_model)
    for name in ours:
        # Equal weights at differently aligned addresses (safetensors memory maps) round differently by
        # ~1e-6; decoding amplifies that (depth is in metres, x 8; normals are renormalised): 1e-4 there.
        torch.testing.assert_close(ours[name].latents, theirs[name].latents, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours[name].raw, theirs[name].raw, atol=1e-4, rtol=0)
        assert ours[name].raw.abs().max() > 0  # a real prediction, not zeros


def test_fp16_stored_checkpoint_loads_the_rounded_weights_in_fp32(components, tiny_base, tmp_path):
    """Most distributed SD 1.5 files hold fp16 tensors."""
    path = write_single_file(tmp_path / "half.safetensors", *components, dtype=torch.float16)
    base = load_base(path, device="cpu", precision="fp32", config=tiny_base)
    assert {p.dtype for p in base.unet.parameters()} == {torch.float32}
    # Exact: both sides round fp32 to fp16 once (IEEE round to nearest even) and widen back exactly.
    expected = {k: v.half().float() for k, v in components[0].state_dict().items()}
    for key, value in base.unet.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=0, rtol=0, msg=key)


class NetworkUsed(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a host fails the test."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise NetworkUsed(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts
    assert attempts == []


def test_loading_touches_no_network(no_network, single_files, tiny_base):
    for path in single_files.values():
        model = DMPModel.from_pretrained(path, device="cpu", precision="fp32", config=tiny_base)
        assert model.text.empty_embedding().shape == (1, 77, 32)
    DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32").text.empty_embedding()
    # no config: the architecture is read off the tensor shapes, offline too
    assert DMPModel.from_pretrained(single_files["safetensors"], device="cpu").unet.config.cross_attention_dim == 32


def test_loading_touches_no_network_even_without_offline_variables(single_files, tiny_base, tmp_path):
    """A fresh process with HF_HUB_OFFLINE unset and an empty hub cache: only local_files_only keeps it off the hub."""
    script = textwrap.dedent(f"""
        import socket, sys
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(args)
            raise OSError("network access attempted")
        socket.create_connection = socket.getaddrinfo = refuse
        socket.socket.connect = socket.socket.connect_ex = refuse
        from dmp_model import DMPModel
        from dmp_model.io.weight_files import CheckpointError
        model = DMPModel.from_pretrained({str(single_files["safetensors"])!r}, device="cpu", precision="fp32",
                                         config={str(tiny_base)!r})
        assert model.text.empty_embedding().shape == (1, 77, 32)
        model = DMPModel.from_pretrained({str(tiny_base)!r}, device="cpu", precision="fp32")
        model.text.empty_embedding()
        DMPModel.from_pretrained({str(single_files["safetensors"])!r}, device="cpu").text.empty_embedding()
        assert attempts == [], attempts
        print("OFFLINE-OK")
    """)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OFFLINE-OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("family, shapes", [("sd2", SD2), ("sdxl", SDXL), ("sd1-inpainting", INPAINTING),
                                            ("lora", DMP_LORA), ("vae", VAE_ONLY)])
def test_single_files_of_other_families_are_refused_before_loading(tmp_path, family, shapes, monkeypatch):
    path = write_keys(tmp_path / f"{family}.safetensors", shapes)
    monkeypatch.setattr(UNet2DConditionModel, "from_single_file", None)  # must not get that far
    with pytest.raises(CheckpointError) as caught:
        DMPModel.from_pretrained(path, device="cpu", precision="fp32")
    message = str(caught.value)
    assert path in message and FOUND[family] in message and "Stable Diffusion 1.x" in message


def test_sd1_file_without_text_encoder_is_refused(components, tmp_path):
    path = write_single_file(tmp_path / "no-text.safetensors", components[0], components[1])
    with pytest.raises(CheckpointError, match="SD 1.x UNet without cond_stage_model.transformer. weights"):
        DMPModel.from_pretrained(path, device="cpu", precision="fp32")


def write_without(path: Path, components, missing: str) -> Path:
    state = {k: v.contiguous() for k, v in ldm_state_dict(*components).items() if k != missing}
    assert len(state) == len(ldm_state_dict(*components)) - 1
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path


@pytest.mark.parametrize("missing, part, suffix", [
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "UNET", ".safetensors"),
    ("model.diffusion_model.out.2.bias", "UNET", ".ckpt"),
    ("first_stage_model.decoder.conv_in.weight", "VAE", ".ckpt"),
    ("first_stage_model.encoder.mid.attn_1.q.weight", "VAE", ".safetensors"),
], ids=["unet-attention", "unet-out", "vae-decoder", "vae-attention"])
def test_incomplete_checkpoint_is_a_clear_error_and_the_next_load_works(
        components, tiny_base, single_files, tmp_path, missing, part, suffix):
    path = write_without(tmp_path / f"incomplete{suffix}", components, missing)
    with pytest.raises(CheckpointError) as caught:
        DMPModel.from_pretrained(path, device="cpu", precision="fp32", config=tiny_base)
    message = str(caught.value)
    assert str(path) in message and f"some {part} weights" in message and "incomplete" in message
    assert "meta tensor" not in message
    model = DMPModel.from_pretrained(single_files["safetensors"], device="cpu", precision="fp32", config=tiny_base)
    assert_same_weights(model.unet, components[0])


def test_missing_text_encoder_tensor_is_reported_when_the_encoder_loads(components, tiny_base, tmp_path):
    path = write_without(tmp_path / "no-ln.safetensors", components,
                         "cond_stage_model.transformer.text_model.final_layer_norm.weight")
    model = DMPModel.from_pretrained(path, device="cpu", precision="fp32", config=tiny_base)
    with pytest.raises(CheckpointError, match=r"1 CLIPTextModel weights are missing .*final_layer_norm.weight"):
        model.text.empty_embedding()


@pytest.mark.parametrize("name, content, error, message", [
    ("empty.safetensors", b"", CheckpointError, "is empty"),
    ("garbage.safetensors", b"\x00" * 64, CheckpointError, "corrupt or truncated"),
    ("garbage.ckpt", b"not a pickle at all" * 10, CheckpointError, "corrupt"),
], ids=["empty", "zeros", "text"])
def test_unreadable_files_are_refused_and_the_process_keeps_working(
        tmp_path, tiny_base, single_files, name, content, error, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(error, match=message):
        DMPModel.from_pretrained(path, device="cpu", precision="fp32", config=tiny_base)
    assert DMPModel.from_pretrained(single_files["ckpt"], device="cpu", precision="fp32", config=tiny_base).unet


def test_truncated_single_file_is_refused(single_files, tmp_path, tiny_base):
    data = single_files["safetensors"].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated: download it again"):
        DMPModel.from_pretrained(path, device="cpu", precision="fp32", config=tiny_base)


def test_ckpt_with_code_is_refused_without_running_it(tmp_path, tiny_base, components):
    marker = tmp_path / "code-ran"
    state = {k: v.contiguous() for k, v in ldm_state_dict(*components).items()}
    torch.save({"state_dict": state, "callback": Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="not loaded for safety"):
        DMPModel.from_pretrained(tmp_path / "evil.ckpt", device="cpu", precision="fp32", config=tiny_base)
    assert not marker.exists()


def test_a_miniature_single_file_loads_without_config_from_its_shapes(tmp_path):
    """A non-SD-sized file following SD 1.x's conventions (8 heads, 32 groups, 64-wide text heads) needs no config."""
    from transformers import CLIPTextConfig

    from dmp_model.sd.tiny import save_tiny_sd, tiny_text_encoder_config, tiny_unet_config, tiny_vae_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**tiny_unet_config(32, 64), "attention_head_dim": 8, "norm_num_groups": 32})
    vae = AutoencoderKL(**{**tiny_vae_config(32), "norm_num_groups": 32})
    text = CLIPTextModel(CLIPTextConfig(**{**tiny_text_encoder_config(64), "num_attention_heads": 1}))
    folder = save_tiny_sd(tmp_path / "folder", components=(unet.eval(), vae.eval(), text.eval()))
    single = write_single_file(tmp_path / "mini.safetensors", unet, vae, text)
    from_file = DMPModel.from_pretrained(single, device="cpu", precision="fp32")
    from_folder = DMPModel.from_pretrained(folder, device="cpu", precision="fp32")
    assert_same_weights(from_file.unet, from_folder.unet)
    assert_same_weights(from_file.vae, from_folder.vae)
    assert from_file.unet.config.block_out_channels == [32, 64, 64, 64]
    torch.testing.assert_close(from_file.text.empty_embedding(), from_folder.text.empty_embedding(),
                               atol=1e-5, rtol=0)
