"""Weight files: what kind of model a file holds, and every way of reading one that must fail cleanly.

Detection works on key names and shapes only, so the "checkpoints" here are key -> shape tables
(``weight_keys.py``) in the layouts real files have (SD 2.x, SDXL, SD3, Flux, inpainting, LoRA, VAE, ...); where a
file is needed it is written with those keys and tiny tensors (only the shapes detection reads
are real). Every refusal must be a CheckpointError that names the file and what was found.
"""

from __future__ import annotations

import io
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from dmp_model.io.weight_files import (
    MODEL_FAMILIES,
    CheckpointError,
    check_sd1,
    describe_family,
    detect_family,
    read_key_shapes,
    read_state_dict,
)
from weight_keys import (
    DIFFUSERS_TEXT,
    DIFFUSERS_UNET,
    DMP_LORA,
    FLUX,
    FOUND,
    INPAINTING,
    INSTRUCT,
    KOHYA_LORA,
    OLD_DIFFUSERS_LORA,
    PEFT_LORA,
    RANDOM,
    SD1,
    SD2,
    SD3,
    SDXL,
    VAE_KEYS,
    VAE_ONLY,
    Payload,
    U,
    write_keys,
)

CASES = [
    ("sd1", SD1), ("sd2", SD2), ("sd2", {k: v for k, v in SD2.items() if "cond_stage_model" not in k}),
    ("sdxl", SDXL), ("sdxl", {k: v for k, v in SDXL.items() if not k.startswith("conditioner")}),
    ("sd3", SD3), ("flux", FLUX), ("flux", {U + k: v for k, v in FLUX.items()}),
    ("sd1-inpainting", INPAINTING), ("sd1-instruct", INSTRUCT),
    ("lora", KOHYA_LORA), ("lora", DMP_LORA), ("lora", PEFT_LORA), ("lora", OLD_DIFFUSERS_LORA),
    ("vae", VAE_ONLY), ("vae", VAE_KEYS), ("diffusers-weights", DIFFUSERS_UNET), ("diffusers-weights", DIFFUSERS_TEXT),
    ("unknown", RANDOM), ("unknown", {}),
]
IDS = [f"{family}-{i}" for i, (family, _) in enumerate(CASES)]


@pytest.mark.parametrize("family, shapes", CASES, ids=IDS)
def test_detect_family_from_keys_and_shapes(family, shapes):
    assert detect_family(shapes) == family


def test_every_family_has_a_description():
    assert {describe_family(f) for f in MODEL_FAMILIES} and all(describe_family(f) for f in MODEL_FAMILIES)
    assert set(FOUND) | {"sd1"} == set(MODEL_FAMILIES)


@pytest.mark.parametrize("family, shapes", [c for c in CASES if c[0] != "sd1" and c[1]],
                         ids=[i for i, c in zip(IDS, CASES) if c[0] != "sd1" and c[1]])
def test_files_of_other_families_are_refused_naming_what_was_found(tmp_path, family, shapes):
    path = write_keys(tmp_path / f"{family}.safetensors", shapes)
    assert detect_family(read_key_shapes(path)) == family  # shapes survive the file
    with pytest.raises(CheckpointError) as caught:
        check_sd1(path, read_key_shapes(path))
    message = str(caught.value)
    assert path in message and FOUND[family] in message and "Stable Diffusion 1.x" in message


@pytest.mark.parametrize("drop, missing", [("cond_stage_model.", "cond_stage_model.transformer."),
                                           ("first_stage_model.", "first_stage_model.")])
def test_sd1_file_without_text_encoder_or_vae_is_refused(tmp_path, drop, missing):
    shapes = {k: v for k, v in SD1.items() if not k.startswith(drop)}
    path = write_keys(tmp_path / "unet-only.safetensors", shapes)
    assert detect_family(shapes) == "sd1"
    with pytest.raises(CheckpointError, match=f"SD 1.x UNet without {missing}"):
        check_sd1(path, read_key_shapes(path))


def test_read_key_shapes_does_not_read_tensor_data(tmp_path, monkeypatch):
    path = write_keys(tmp_path / "sd1.safetensors", SD1)
    import safetensors

    calls = []
    original = safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.inner = original(*args, **kwargs)

        def __enter__(self):
            handle = self.inner.__enter__()
            get_tensor = handle.get_tensor

            class Handle:
                def __getattr__(self, name):
                    return getattr(handle, name)

                def get_tensor(self, key):
                    calls.append(key)
                    return get_tensor(key)

            return Handle()

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    shapes = read_key_shapes(path)
    assert shapes == {k: tuple(v) if "input_blocks.0.0" in k or "attn2" in k else tuple(min(d, 2) for d in v)
                      for k, v in SD1.items()}
    assert calls == []


def test_state_dict_round_trip_with_prefix_filter_and_compvis_nesting(tmp_path):
    tensors = {"model.diffusion_model.a": torch.arange(3.0), "first_stage_model.b": torch.ones(2),
               "cond_stage_model.c": torch.zeros(1)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt", "note": "hi"})
    torch.save({"global_step": 10, "state_dict": {"state_dict": tensors}}, tmp_path / "x.ckpt")
    for name in ("x.safetensors", "x.ckpt"):
        kept, metadata = read_state_dict(tmp_path / name, prefixes=("model.diffusion_model.", "first_stage_model."))
        assert sorted(kept) == ["first_stage_model.b", "model.diffusion_model.a"]
        assert torch.equal(kept["model.diffusion_model.a"], torch.arange(3.0))
        assert metadata == ({"format": "pt", "note": "hi"} if name.endswith("safetensors") else {})


# ---------------------------------------------------------------------------------------------
# Damaged and hostile files


def legacy_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def zip_checkpoint(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


GOOD = {"state_dict": {"model.diffusion_model.x": torch.arange(64.0)}}


@pytest.mark.parametrize("name, content, message", [
    ("empty.safetensors", b"", "is empty"),
    ("empty.ckpt", b"", "is empty"),
    ("garbage.safetensors", bytes(range(256)) * 8, "corrupt or truncated"),
    ("text.ckpt", b"hello world, not a checkpoint\n" * 20, "corrupt"),
    ("garbage.ckpt", bytes(range(255, -1, -1)) * 8, "corrupt"),
    ("garbage.bin", b"\x80\x02" + bytes(range(7, 250, 3)) * 3, "corrupt"),
    ("half.ckpt", zip_checkpoint(GOOD)[:700], "corrupt or truncated"),
    ("half-legacy.ckpt", legacy_pickle(GOOD)[:300], "corrupt"),
    ("zip-not-torch.ckpt", None, "corrupt or truncated"),
    ("list.ckpt", zip_checkpoint([torch.zeros(2)]), "does not hold a dictionary of named tensors"),
])
def test_damaged_files_raise_a_checkpoint_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "an ordinary zip archive")
    else:
        path.write_bytes(content)
    for read in (read_key_shapes, read_state_dict):
        with pytest.raises(CheckpointError, match=message) as caught:
            read(path)
        assert str(path) in str(caught.value)


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_never_escape_as_anything_but_checkpoint_error(tmp_path, seed):
    """torch's unpickler fails on garbage with KeyError, IndexError, struct.error, ...: all must be wrapped."""
    generator = torch.Generator().manual_seed(seed)
    for length in (1, 3, 17, 200):
        data = bytes(torch.randint(0, 256, (length,), generator=generator, dtype=torch.uint8).tolist())
        for prefix in (b"", b"\x80\x02"):
            path = tmp_path / f"r{length}.ckpt"
            path.write_bytes(prefix + data)
            with pytest.raises(CheckpointError):
                read_state_dict(path)


def test_truncated_safetensors_is_refused_with_advice(tmp_path):
    save_file({"model.diffusion_model.x": torch.zeros(1000)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    for cut in (4, 40, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        for read in (read_key_shapes, read_state_dict):
            with pytest.raises(CheckpointError, match="corrupt or truncated: download it again"):
                read(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("writer", ["pickle", "torch-zip", "torch-legacy"])
def test_pickled_code_is_refused_and_never_run(tmp_path, writer):
    marker = tmp_path / "code-ran"
    state = {"state_dict": {"model.diffusion_model.x": torch.zeros(2), "evil": Payload(marker)}}
    path = tmp_path / "evil.ckpt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(state))
    elif writer == "torch-zip":
        path.write_bytes(zip_checkpoint(state))
    else:
        path.write_bytes(legacy_pickle(state))
    for read in (read_key_shapes, read_state_dict):
        with pytest.raises(CheckpointError, match="not loaded for safety") as caught:
            read(path)
        assert str(path) in str(caught.value)
    assert not marker.exists()


def test_missing_file(tmp_path):
    for read in (read_key_shapes, read_state_dict):
        with pytest.raises(FileNotFoundError, match="weight file not found"):
            read(tmp_path / "absent.safetensors")


def test_non_tensor_entries_of_a_ckpt_are_dropped(tmp_path):
    torch.save({"state_dict": {"a": torch.ones(2), "step": 5, "name": "x"}}, tmp_path / "mixed.ckpt")
    tensors, _ = read_state_dict(tmp_path / "mixed.ckpt")
    assert list(tensors) == ["a"]
