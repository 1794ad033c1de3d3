"""Adapters in every layout give exactly W + up @ down; wrong ones are refused, never ignored."""

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dmp_model import AdapterInfo, DMPModel
from dmp_model.adapters import (
    adapter_name,
    detect_adapter_format,
    fold_alpha,
    infer_info_from_name,
    info_to_metadata,
    lora_modules,
    open_adapter,
    save_adapter,
    shape_problem,
)
from dmp_model.io.weight_files import CheckpointError
from dmp_model.sd.lora import to_peft_state_dict
from factories import attention_layers, merged_unet, official_state_dict, random_lora, write_official_adapter


@pytest.fixture(scope="module")
def model(tiny_base):
    return DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")


def unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor(401), encoder_hidden_states=context).sample


# peft's unmerged layers compute x W^T + (x A^T) B^T, the hand-merged copy x (W + BA)^T: the same
# maths in a different float32 order, so the outputs (scale ~1) agree to ~1e-6 (measured 8e-7), and
# by how much depends on the BLAS. 1e-4 leaves room for any of them; a missing or wrongly scaled
# adapter moves the output by ~0.09 (the `not allclose(base, ...)` check), 1000x the tolerance.
LORA_TOL = {"atol": 1e-4, "rtol": 1e-4}


def base_reference(model):
    """The base UNet without any adapter (copied before adapters patch it)."""
    if not hasattr(model, "_pristine"):
        model._pristine = copy.deepcopy(model.unet)
    return model._pristine


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("self_attn_only", [False, True])
def test_official_adapter_equals_hand_merged_weights(model, tmp_path, fmt, self_attn_only):
    base = base_reference(model)
    lora = random_lora(model.unet, seed=3, self_attn_only=self_attn_only)
    folder = write_official_adapter(model.unet, tmp_path / f"depth-x-{fmt}-{self_attn_only}", 3, fmt,
                                    self_attn_only=self_attn_only)
    info = model.load_adapter(folder)
    assert info.task == "depth" and info.rank == 4 and info.self_attn_only is self_attn_only
    assert model._adapters[folder.name].layers == len(lora) == (64 if self_attn_only else 128)
    model.unet.set_adapter(folder.name)
    expected = unet_output(merged_unet(base, lora))
    torch.testing.assert_close(unet_output(model.unet), expected, **LORA_TOL)
    assert not torch.allclose(unet_output(base), expected, atol=1e-3)  # the adapter does change the output


def kohya_state_dict(lora, alpha):
    """kohya-ss layout with the diffusers module names sd-scripts uses for SD 1.x."""
    out = {}
    for module, (down, up) in lora.items():
        key = "lora_unet_" + module.replace(".", "_")
        out[f"{key}.lora_down.weight"] = down
        out[f"{key}.lora_up.weight"] = up * down.shape[0] / alpha  # so that alpha / rank * up == up
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def test_kohya_adapter_with_alpha_folds_its_scale(model, tmp_path):
    base = base_reference(model)
    lora = random_lora(model.unet, seed=5)
    save_file(kohya_state_dict(lora, alpha=2.0), str(tmp_path / "kohya-style.safetensors"))
    info = model.load_adapter(tmp_path / "kohya-style.safetensors", task="rgb")
    assert info.task == "rgb"
    model.unet.set_adapter("kohya-style")
    torch.testing.assert_close(unet_output(model.unet), unet_output(merged_unet(base, lora)), **LORA_TOL)


def test_peft_adapter_with_lora_alpha_metadata(model, tmp_path):
    base = base_reference(model)
    lora = random_lora(model.unet, seed=6)
    tensors = {}
    for module, (down, up) in lora.items():
        tensors[f"unet.{module}.lora_A.weight"] = down
        tensors[f"unet.{module}.lora_B.weight"] = up / 2  # lora_alpha 8 / r 4 scales it back
    save_file(tensors, str(tmp_path / "peft.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})})
    model.load_adapter(tmp_path / "peft.safetensors", name="peft-style")
    model.unet.set_adapter("peft-style")
    torch.testing.assert_close(unet_output(model.unet), unet_output(merged_unet(base, lora)), **LORA_TOL)


def test_adapters_switch_without_reloading_the_base(model, tmp_path):
    first = write_official_adapter(model.unet, tmp_path / "normal-a", seed=7)
    second = write_official_adapter(model.unet, tmp_path / "normal-b", seed=8)
    unet_before = model.unet
    model.load_adapter(first)
    model.load_adapter(second)
    outputs = {}
    for name in ("normal-a", "normal-b", "normal-a"):
        model.unet.set_adapter(name)
        outputs.setdefault(name, []).append(unet_output(model.unet))
    assert model.unet is unet_before
    # Exact by construction: the same adapter's unchanged tensors, the same inputs and batch shape,
    # the same (unmerged) layers in the same process: the same float ops in the same order.
    torch.testing.assert_close(outputs["normal-a"][0], outputs["normal-a"][1], atol=0, rtol=0)
    assert not torch.allclose(outputs["normal-a"][0], outputs["normal-b"][0])


def test_reloading_the_same_file_is_free_and_a_changed_file_is_reloaded(model, tmp_path):
    folder = write_official_adapter(model.unet, tmp_path / "depth-reload", seed=9)
    model.load_adapter(folder)
    model.unet.set_adapter("depth-reload")
    before = unet_output(model.unet)
    info = model.load_adapter(folder, target_scale=4.0)  # metadata override only, same weights
    assert info.target_scale == 4.0
    write_official_adapter(model.unet, folder, seed=10)  # new weights at the same path
    model.load_adapter(folder)
    model.unet.set_adapter("depth-reload")
    assert not torch.allclose(unet_output(model.unet), before)


def test_sdxl_shaped_adapter_is_refused(model, tmp_path):
    lora = random_lora(model.unet, seed=11)
    generator = torch.Generator().manual_seed(11)
    wide = {name: (torch.randn(4, 2048, generator=generator), up) if name.endswith("attn2.to_k") else (down, up)
            for name, (down, up) in lora.items()}
    save_file(official_state_dict(wide), str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit this model: \d+ of 128 LoRA layers fit.*2048"):
        model.load_adapter(tmp_path / "sdxl.safetensors")
    assert "sdxl" not in model.adapters


def test_adapter_for_layers_that_do_not_exist_is_refused(model, tmp_path):
    tensors = {"down_blocks.9.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
               torch.zeros(4, 32),
               "down_blocks.9.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight":
               torch.zeros(32, 4)}
    save_file(tensors, str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ValueError, match="0 of 1 LoRA layers fit.*no such layer"):
        model.load_adapter(tmp_path / "nowhere.safetensors")


def test_file_without_lora_weights_is_refused(model, tmp_path):
    save_file({"conv.weight": torch.zeros(3, 3)}, str(tmp_path / "not-lora.safetensors"))
    with pytest.raises(ValueError, match="no LoRA weights found"):
        model.load_adapter(tmp_path / "not-lora.safetensors")


def test_truncated_adapter_file_is_refused_with_advice(model, tmp_path):
    folder = write_official_adapter(model.unet, tmp_path / "depth-cut", seed=12)
    file = folder / "pytorch_lora_weights.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        model.load_adapter(folder)


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_with_code_is_never_executed(model, tmp_path):
    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"x": Payload()}, f)
    with pytest.raises(CheckpointError, match="not loaded for safety"):
        model.load_adapter(path)


def test_missing_adapter_path_and_unknown_name(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter not found"):
        model.load_adapter(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="has no pytorch_lora_weights"):
        (tmp_path / "empty-folder").mkdir()
        model.load_adapter(tmp_path / "empty-folder")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.predict(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)), "nope")


@pytest.mark.parametrize("name, task, prompts, scale", [
    ("depth-hypersim-notext", "depth", False, 8.0), ("normal-scene100-notext", "normal", False, 1.0),
    ("segmentation", "segmentation", True, 1.0), ("seg-bedroom", "segmentation", True, 1.0),
    ("albedo", "albedo", True, 1.0), ("shading", "shading", True, 1.0), ("my-custom", "rgb", False, 1.0)])
def test_adapter_facts_inferred_from_dmp_names(name, task, prompts, scale):
    facts = infer_info_from_name(name)
    info = AdapterInfo(**facts)
    assert (info.task, info.uses_prompts, info.target_scale) == (task, prompts, scale)


def test_metadata_beats_the_name_and_the_caller_beats_both(model, tmp_path):
    lora = random_lora(model.unet, seed=13)
    info = AdapterInfo(task="normal", uses_prompts=True, normal_convention="marigold", steps_trained=7)
    save_file(official_state_dict(lora), str(tmp_path / "depth-named.safetensors"), metadata=info_to_metadata(info))
    loaded = model.load_adapter(tmp_path / "depth-named.safetensors", uses_prompts=False)
    assert (loaded.task, loaded.normal_convention, loaded.steps_trained) == ("normal", "marigold", 7)
    assert loaded.uses_prompts is False
    with pytest.raises(ValueError, match="task must be one of"):
        model.load_adapter(tmp_path / "depth-named.safetensors", name="other", task="height")
    with pytest.raises(TypeError, match="unknown adapter settings"):
        model.load_adapter(tmp_path / "depth-named.safetensors", name="other2", colour="red")


def test_save_adapter_round_trip_in_official_layout(model, tmp_path):
    lora = random_lora(model.unet, seed=14)
    peft_keys = {}
    for module, (down, up) in lora.items():
        peft_keys[f"{module}.lora_A.weight"], peft_keys[f"{module}.lora_B.weight"] = down, up / 2
    info = AdapterInfo(task="depth", target_scale=8.0, rank=4, steps_trained=100)
    path = save_adapter(tmp_path / "out" / "depth-trained.safetensors", peft_keys, info, lora_scale=2.0)
    opened = open_adapter(path)
    tensors, metadata = opened.tensors, opened.metadata
    assert detect_adapter_format(tensors) == "dmp"
    assert all(k.endswith(("_lora.down.weight", "_lora.up.weight")) for k in tensors)
    assert metadata["dmp.task"] == '"depth"' and metadata["dmp.steps_trained"] == "100"
    converted = to_peft_state_dict(tensors, model.unet.config)
    # up / 2 * lora_scale 2 is exact (powers of two), so both sides are the same matmul of the same tensors.
    for module, (down, up) in lora.items():
        torch.testing.assert_close(converted[f"{module}.lora_B.weight"] @ converted[f"{module}.lora_A.weight"],
                                   up @ down)
    assert not list(path.parent.glob(".*tmp*"))


def test_every_attention_projection_is_adapted(model):
    assert len(attention_layers(model.unet)) == 128  # 16 transformer blocks x (attn1, attn2) x 4


def test_one_naming_policy_for_the_library_and_the_nodes(tmp_path):
    first, second = tmp_path / "a" / "depth-x" / "w.safetensors", tmp_path / "b" / "depth-x" / "w.safetensors"
    assert adapter_name("depth-x", first, {}) == "depth-x"
    assert adapter_name("depth-x", first, {"depth-x": first}) == "depth-x"  # the same file: loaded again in place
    assert adapter_name("depth-x", second, {"depth-x": first}) == "depth-x~2"
    assert adapter_name("depth-x", second, {"depth-x": first, "depth-x~2": tmp_path / "c"}) == "depth-x~3"


def test_lora_helpers_read_every_layout_and_fold_alpha():
    down, up = torch.ones(4, 8), torch.ones(16, 4)
    layouts = {"m.processor.to_q_lora.down.weight": down, "lora_unet_m.lora_down.weight": down,
               "m2.to_q.lora_A.weight": down, "m3.to_q.lora.down.weight": down, "m2.to_q.lora_B.weight": up}
    assert set(lora_modules(layouts)) == {"m.processor.to_q", "lora_unet_m", "m2.to_q", "m3.to_q"}
    assert fold_alpha(up, None) is up and fold_alpha(up, 4) is up
    assert torch.equal(fold_alpha(up, 8), up * 2)  # alpha / rank = 2, exact
    assert shape_problem("m", 8, 16, 8, 16) is None
    assert shape_problem("m", 8, 16, 8, 32) == "m: adapter maps 8->16 features, the layer 8->32"
