"""The LDM/CompVis single-file writer (tests/support/ldm_layout.py) against diffusers' own single-file loader.

A tiny SD 1.x is written in the original key layout (.safetensors and CompVis .ckpt), read back
with ``from_single_file(..., config=<local diffusers folder>, local_files_only=True)`` and must
come back bit-identical. The real SD 1.x configs, built on the meta device, must give the key
names and shapes of a real SD 1.5 checkpoint. A few tests pin diffusers (0.42) single-file
behaviours that our own loader relies on or must make up for; they say so in their docstrings.
Nothing here touches the network.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel

from dmp_model.sd.loading import SD1_CONFIG_DIR
from dmp_model.sd.tiny import build_tiny_components, save_tiny_sd

try:
    from ldm_layout import (
        TEXT_ENCODER_PREFIX,
        UNET_PREFIX,
        VAE_PREFIX,
        ldm_state_dict,
        text_encoder_to_ldm,
        unet_to_ldm,
        vae_to_ldm,
        write_single_file,
    )
except ImportError:  # tests/ itself on sys.path (pytest's rootdir-less import mode)
    from ldm_layout import (
        TEXT_ENCODER_PREFIX,
        UNET_PREFIX,
        VAE_PREFIX,
        ldm_state_dict,
        text_encoder_to_ldm,
        unet_to_ldm,
        vae_to_ldm,
        write_single_file,
    )

SD1_CONFIGS = SD1_CONFIG_DIR
POSITION_IDS = TEXT_ENCODER_PREFIX + "embeddings.position_ids"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(unet, vae, text_encoder, diffusers folder) of a tiny SD 1.x."""
    unet, vae, text_encoder = build_tiny_components(seed=0)
    folder = save_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), components=(unet, vae, text_encoder))
    return unet, vae, text_encoder, folder


def _load_unet(path_or_dict, folder, **kw):
    return UNet2DConditionModel.from_single_file(
        path_or_dict if isinstance(path_or_dict, dict) else str(path_or_dict),
        config=str(folder), subfolder="unet", local_files_only=True, **kw)


def _load_vae(path_or_dict, folder, **kw):
    return AutoencoderKL.from_single_file(
        path_or_dict if isinstance(path_or_dict, dict) else str(path_or_dict),
        config=str(folder), subfolder="vae", local_files_only=True, **kw)


def _load_text_encoder(path_or_dict, folder, **kw):
    checkpoint = path_or_dict if isinstance(path_or_dict, dict) else sfu.load_single_file_checkpoint(
        str(path_or_dict), local_files_only=True)
    return sfu.create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, config=str(folder), subfolder="text_encoder", local_files_only=True, **kw)


def _assert_same_tensors(original: torch.nn.Module, loaded: torch.nn.Module) -> None:
    """Every parameter and buffer (persistent or not) present, materialised and bit-identical."""
    for kind in ("named_parameters", "named_buffers"):
        ours = dict(getattr(original, kind)())
        theirs = dict(getattr(loaded, kind)())
        assert ours.keys() == theirs.keys(), kind
        for name, tensor in ours.items():
            other = theirs[name]
            assert other.device.type != "meta", f"{name} was never loaded"
            assert other.dtype == tensor.dtype and other.shape == tensor.shape, name
            assert torch.equal(other, tensor), name


def _realign(module: torch.nn.Module) -> None:
    """Copy every tensor into freshly allocated memory.

    Tensors read from a .safetensors file are only 8-byte aligned (safetensors' layout); CPU
    kernels take other code paths on unaligned weights and round differently (~1e-6). Equal
    weights give bit-identical outputs only once they are equally aligned.
    """
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.data.clone()


def _outputs(unet, vae, text_encoder):
    gen = torch.Generator().manual_seed(123)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, text_encoder.config.hidden_size, generator=gen)
    image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    ids = torch.full((1, 77), 49407, dtype=torch.long)
    ids[0, :4] = torch.tensor([49406, 320, 1125, 49407])
    with torch.no_grad():
        latent = vae.encode(image).latent_dist.mean
        return {
            "unet": unet(sample, 10, encoder_hidden_states=context).sample,
            "latent": latent,
            "decoded": vae.decode(latent).sample,
            "text": text_encoder(ids).last_hidden_state,
        }


# ----------------------------------------------------------------------------- tiny round trip


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_tiny_single_file_round_trip(tiny, tmp_path, fmt):
    unet, vae, text_encoder, folder = tiny
    path = write_single_file(tmp_path / f"tiny.{fmt}", unet, vae, text_encoder, fmt=fmt,
                             ckpt_extra={"global_step": 470000, "epoch": 3} if fmt == "ckpt" else None)
    if fmt == "ckpt":  # the CompVis .ckpt layout: weights under "state_dict"
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert set(raw) == {"state_dict", "global_step", "epoch"}

    unet2 = _load_unet(path, folder)
    vae2 = _load_vae(path, folder)
    text_encoder2 = _load_text_encoder(path, folder)
    for original, loaded in ((unet, unet2), (vae, vae2), (text_encoder, text_encoder2)):
        _assert_same_tensors(original, loaded)

    for module in (unet, vae, text_encoder):  # both sides in fresh allocations (values unchanged)
        _realign(module)
    expected, as_loaded = _outputs(unet, vae, text_encoder), _outputs(unet2, vae2, text_encoder2)
    for module in (unet2, vae2, text_encoder2):
        _realign(module)
    realigned = _outputs(unet2, vae2, text_encoder2)
    for name, tensor in expected.items():
        # Weights straight from the file may take other kernel paths (see _realign): another summation order,
        # ~1e-6 on outputs of scale 1-4. 1e-4 allows any BLAS; a wrong weight or layer is off by far more.
        torch.testing.assert_close(as_loaded[name], tensor, rtol=1e-4, atol=1e-4)
        # Exact by construction: the same classes and configs, bit-identical tensors (checked above) in
        # equally aligned fresh allocations, the same inputs, one process: the same float ops in the same
        # order. Bit equality also catches config slips too small for a tolerance (an eps, a scale).
        assert torch.equal(realigned[name], tensor), name


def test_tiny_key_layout(tiny):
    unet, vae, text_encoder, _ = tiny
    sd = ldm_state_dict(unet, vae, text_encoder)
    ldm_unet, ldm_vae, ldm_text = unet_to_ldm(unet), vae_to_ldm(vae), text_encoder_to_ldm(text_encoder)
    assert len(ldm_unet) == len(unet.state_dict())
    assert len(ldm_vae) == len(vae.state_dict())
    assert len(ldm_text) == len(text_encoder.state_dict()) + 1  # + position_ids
    assert len(sd) == len(ldm_unet) + len(ldm_vae) + len(ldm_text)
    assert all(k.startswith(UNET_PREFIX) for k in ldm_unet)
    assert all(k.startswith(VAE_PREFIX) for k in ldm_vae)
    assert all(k.startswith(TEXT_ENCODER_PREFIX) for k in ldm_text)
    assert not any(".text_model.text_model." in k for k in ldm_text)

    position_ids = sd[POSITION_IDS]
    assert position_ids.dtype == torch.int64 and torch.equal(position_ids, torch.arange(77)[None])
    assert POSITION_IDS not in text_encoder_to_ldm(text_encoder, position_ids=False)

    # LDM's VAE attention is 1x1 convs; the UNet's proj_in/out are 1x1 convs in both layouts.
    for part in ("q", "k", "v", "proj_out"):
        for side in ("encoder", "decoder"):
            assert sd[f"{VAE_PREFIX}{side}.mid.attn_1.{part}.weight"].ndim == 4
    # diffusers recognises it as SD 1.x (what a config-less loader would pick).
    assert sfu.infer_diffusers_model_type(sd) == "v1"
    assert sfu.is_clip_model(sd)


def test_ldm_state_dict_dtype_and_partial(tiny):
    _, vae, text_encoder, _ = tiny
    sd = ldm_state_dict(vae=vae, text_encoder=text_encoder, dtype=torch.float16)
    assert not any(k.startswith(UNET_PREFIX) for k in sd)
    assert sd[POSITION_IDS].dtype == torch.int64
    assert all(v.dtype == torch.float16 for k, v in sd.items() if k != POSITION_IDS)


def test_generic_unet_layout_round_trips_through_diffusers_converter():
    """A UNet unlike SD's (3 levels, 1 layer per block, attention only in the lower levels)."""
    config = {
        "block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 16, "attention_head_dim": 4, "sample_size": 8,
    }
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    ldm = unet_to_ldm(unet)
    # One layer per level: input_blocks 1 (res), 2 (op), 3 (res+attn), 4 (op), 5 (res+attn).
    assert UNET_PREFIX + "input_blocks.2.0.op.weight" in ldm
    assert UNET_PREFIX + "input_blocks.4.0.op.weight" in ldm
    assert UNET_PREFIX + "input_blocks.5.1.proj_in.weight" in ldm
    assert UNET_PREFIX + "input_blocks.1.1.proj_in.weight" not in ldm
    assert UNET_PREFIX + "output_blocks.1.2.conv.weight" in ldm  # attention level: upsampler in slot 2
    assert UNET_PREFIX + "output_blocks.5.0.skip_connection.weight" in ldm
    back = sfu.convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    original = unet.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)  # renamed and reshaped copies: exact


# ----------------------------------------------------------------------------- real SD 1.x names


@pytest.fixture(scope="module")
def sd1_meta():
    """Full-size SD 1.x (unet, vae, text_encoder) from dmp_model/sd/configs/sd1, on the meta device."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD1_CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD1_CONFIGS / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD1_CONFIGS / "text_encoder"))
    return unet, vae, text_encoder


# Keys (with shapes) of the public SD 1.5 checkpoint (v1-5-pruned-emaonly).
SD15_KEYS = {
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
    "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.time_embed.0.weight": (1280, 320),
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.conv_out.weight": (8, 512, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}
SD15_ABSENT = [
    "first_stage_model.encoder.down.3.downsample.conv.weight",
    "first_stage_model.decoder.up.0.upsample.conv.weight",
    "model.diffusion_model.output_blocks.11.1.conv.weight",
    "model.diffusion_model.input_blocks.12.0.op.weight",
]


def test_sd1_config_gives_real_sd15_key_names(sd1_meta):
    unet, vae, text_encoder = sd1_meta
    sd = ldm_state_dict(unet, vae, text_encoder)
    for key, shape in SD15_KEYS.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    for key in SD15_ABSENT:
        assert key not in sd, key
    # 686 UNet + 248 VAE + 197 CLIP (196 weights + position_ids) tensors, as in SD 1.5.
    assert sum(k.startswith(UNET_PREFIX) for k in sd) == len(unet.state_dict()) == 686
    assert sum(k.startswith(VAE_PREFIX) for k in sd) == len(vae.state_dict()) == 248
    assert sum(k.startswith(TEXT_ENCODER_PREFIX) for k in sd) == len(text_encoder.state_dict()) + 1 == 197
    assert sfu.infer_diffusers_model_type(sd) == "v1"


def test_sd1_names_round_trip_through_diffusers_converters(sd1_meta):
    """diffusers' LDM -> diffusers converters consume every key we write and rebuild every key."""
    unet, vae, text_encoder = sd1_meta
    checks = [
        (sfu.convert_ldm_unet_checkpoint(unet_to_ldm(unet), dict(unet.config)), unet.state_dict()),
        (sfu.convert_ldm_vae_checkpoint(vae_to_ldm(vae), dict(vae.config)), vae.state_dict()),
    ]
    text = sfu.convert_ldm_clip_checkpoint(text_encoder_to_ldm(text_encoder))
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    assert text.pop("embeddings.position_ids").shape == (1, 77)
    checks.append((text, text_encoder.state_dict()))
    for converted, expected in checks:
        assert converted.keys() == expected.keys()
        for key, tensor in expected.items():
            assert converted[key].shape == tensor.shape, key


# ----------------------------------------------------------------------------- diffusers behaviour


def test_fp16_file_loads_as_float32_unless_torch_dtype(tiny, tmp_path):
    """diffusers 0.42: a half-precision file is upcast to the model's default dtype (float32) unless
    `torch_dtype` is passed; position_ids stays int64 in the file."""
    unet, vae, text_encoder, folder = tiny
    path = write_single_file(tmp_path / "half.safetensors", unet, vae, text_encoder, dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.get_slice(POSITION_IDS).get_dtype() == "I64"
        assert f.get_slice(UNET_PREFIX + "out.2.weight").get_dtype() == "F16"

    upcast = _load_unet(path, folder)
    assert upcast.dtype == torch.float32
    assert torch.equal(upcast.conv_out.weight, unet.conv_out.weight.half().float())  # casts: exact, by construction
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = _load_unet(path, folder, torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    assert torch.equal(half.conv_out.weight, unet.conv_out.weight.half())
    assert _load_text_encoder(path, folder).dtype == torch.float32
    assert _load_text_encoder(path, folder, torch_dtype=torch.float16).dtype == torch.float16


def test_extra_keys_are_ignored(tiny):
    """diffusers 0.42: keys outside a component (EMA, schedule buffers, odd position_ids) are dropped
    silently; only keys that map INTO the component but match no parameter are warned about."""
    unet, vae, text_encoder, folder = tiny
    sd = ldm_state_dict(unet, vae, text_encoder)
    sd["alphas_cumprod"] = torch.ones(1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd[POSITION_IDS] = torch.arange(77.0)[None] * 0.999  # some old SD 1.x files carry float position_ids
    _assert_same_tensors(unet, _load_unet(sd, folder))
    _assert_same_tensors(vae, _load_vae(sd, folder))
    _assert_same_tensors(text_encoder, _load_text_encoder(sd, folder))


def test_missing_component_raises(tiny):
    """diffusers 0.42: a file without the VAE / CLIP raises rather than returning random weights."""
    unet, _, _, folder = tiny
    unet_only = ldm_state_dict(unet=unet)
    with pytest.raises(sfu.SingleFileComponentError):
        _load_vae(unet_only, folder)
    with pytest.raises(ValueError, match="CLIP"):
        _load_text_encoder(unet_only, folder)


def test_missing_single_key_is_not_a_clean_error(tiny):
    """diffusers 0.42 has no strict mode: a missing tensor is never reported by name. Per path it
    (a) crashes late with 'Cannot copy out of meta tensor' (default low_cpu_mem_usage=True),
    (b) keeps the random init silently (low_cpu_mem_usage=False), or
    (c) leaves the parameter on the meta device silently (CLIP helper).
    A loader that wants a useful error must compare key sets itself."""
    unet, _, text_encoder, folder = tiny
    sd = ldm_state_dict(unet=unet, text_encoder=text_encoder)
    del sd[UNET_PREFIX + "input_blocks.1.1.proj_in.weight"]
    del sd[TEXT_ENCODER_PREFIX + "encoder.layers.0.mlp.fc1.weight"]
    with pytest.raises(NotImplementedError, match="meta tensor"):
        _load_unet(sd, folder)
    # The random init comes from the global generator: seeded apart from the tiny model's (seed 0), so
    # that it cannot reproduce the missing weight whatever ran before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(12345)
        loaded = _load_unet(sd, folder, low_cpu_mem_usage=False)
    assert not torch.equal(loaded.down_blocks[0].attentions[0].proj_in.weight,
                           unet.down_blocks[0].attentions[0].proj_in.weight)
    assert _load_text_encoder(sd, folder).encoder.layers[0].mlp.fc1.weight.device.type == "meta"


def test_without_config_diffusers_wants_the_hub_repo(tiny, tmp_path, monkeypatch):
    """diffusers 0.42: with no `config`, from_single_file infers the model type and loads the config
    of a hub repo (SD 1.x -> stable-diffusion-v1-5/stable-diffusion-v1-5). With local_files_only and
    an empty cache that is an OSError, not a download."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    unet, _, _, _ = tiny
    path = write_single_file(tmp_path / "tiny.safetensors", unet=unet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OSError, match="stable-diffusion-v1-5"):
            UNet2DConditionModel.from_single_file(str(path), local_files_only=True)
