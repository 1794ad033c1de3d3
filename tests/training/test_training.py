"""The trainer on a tiny SD 1.x: objective, exact resume, crash safety, the adapter it writes, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from cli_args import train_argv
from dmp_model import DMPModel
from dmp_model.adapters import ATTENTION_PROJECTIONS
from dmp_model.io.weight_files import read_state_dict
from dmp_model.sampling import schedule_from_config
from training import TrainConfig, train
from training.data import adapter_info
from training.demo.world import write_dataset
from training.metrics import TaskMetrics
from training.objective import dmp_loss
from training.resume import list_checkpoints, load_checkpoint, recover_interrupted, save_checkpoint
from training.trainer import (
    ADAPTER_FILE,
    ADAPTER_NAME,
    add_lora,
    build_datasets,
    load_lora_state_dict,
    load_validation,
    validate,
)

ROOT = Path(__file__).resolve().parents[2]


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Ten 32 px world scenes with every target."""
    return write_dataset(tmp_path_factory.mktemp("world") / "train", 10, size=32, seed=0)


def tiny_config(base: Path, world: Path, out: Path, **changes) -> TrainConfig:
    values = dict(base=str(base), train_images=str(world / "images"), train_targets=str(world / "depth"),
                  task="depth", output_dir=str(out), resolution=32, batch_size=2, max_steps=6,
                  learning_rate=1e-2, warmup_steps=1, checkpoint_every=3, keep_checkpoints=2, val_every=0,
                  val_split=2, val_limit=2,
                  val_previews=2, val_steps=2, log_every=1, rank=2, seed=1)
    values.update(changes)
    return TrainConfig(**values)


def final_state(out: Path) -> dict:
    return load_checkpoint(list_checkpoints(out)[-1])


def test_objective_is_the_method_pages(tiny_base):
    """dmp_loss = MSE(unet(z_t, t), v), z_t = sqrt(a) y + sqrt(1 - a) x, v = sqrt(a) x - sqrt(1 - a) y."""
    model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    generator = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    alphas = schedule_from_config(model.scheduler_config).alphas_cumprod
    loss = dmp_loss(model.unet, x, y, context, alphas, "v_prediction", torch.Generator().manual_seed(5))
    t = torch.randint(0, 1000, (2,), generator=torch.Generator().manual_seed(5))
    a = alphas[t].view(2, 1, 1, 1)
    z_t = a.sqrt() * y + (1 - a).sqrt() * x
    v = a.sqrt() * x - (1 - a).sqrt() * y
    expected = torch.nn.functional.mse_loss(model.unet(z_t, t, context).sample, v)
    # The same formula, possibly in another order (x ** 0.5 or sqrt): ~1e-7 relative, and equal here.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_lora_targets_and_gradient_checkpointing(tiny_base):
    model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    config = TrainConfig(base="b", train_images="i", train_targets="t", self_attn_only=True, rank=3, seed=2)
    params = add_lora(model.unet, config)
    names = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    # 16 transformer blocks x 4 projections x (A, B), self-attention only.
    assert len(names) == 16 * 4 * 2 and all(".attn1." in n for n in names)
    assert all(p.dtype == torch.float32 for p in params)
    generator = torch.Generator().manual_seed(6)
    x, y = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)
    context = torch.zeros(2, 77, 32)
    alphas = model.alphas_cumprod
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
        model.unet.train()
        loss = dmp_loss(model.unet, x, y, context, alphas, "v_prediction", torch.Generator().manual_seed(0))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        for p in params:
            p.grad = None
    torch.testing.assert_close(grads[0], grads[1])  # checkpointing recomputes the same forward
    # Non-zero by mathematics: lora_B starts at 0, so the lora_A gradients are 0, but a lora_B gradient is
    # (dL/d output) (A x)^T with A random, non-zero for the value and output projections at every level
    # (to_q and to_k are 0 by mathematics where attention sees one token: the 1 x 1 mid block of this
    # 4 x 4 latent). The sum is far above rounding.
    assert grads[0].abs().sum() > 0


def test_resume_after_a_crash_continues_exactly(tiny_base, world, tmp_path):
    """6 steps straight == 3 steps, a crash at step 4, resume from the step-3 checkpoint, 3 more steps."""
    straight = train(tiny_config(tiny_base, world, tmp_path / "straight"))
    assert straight.step == 6 and straight.adapter is not None

    crashed = tiny_config(tiny_base, world, tmp_path / "crashed")

    def crash(step):
        if step == 4:
            raise Crash("killed between steps")

    with pytest.raises(Crash):
        train(crashed, on_step=crash)
    assert [p.name for p in list_checkpoints(tmp_path / "crashed")] == ["step-00000003"]
    with pytest.raises(ValueError, match="already holds a training run; pass --resume latest"):
        train(crashed)
    resumed = train(crashed, resume="latest")
    assert resumed.step == 6
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "crashed")
    # Bit for bit by construction: the resumed run restores weights, optimiser moments, random states and the
    # sample plan, so it performs the same operations in the same order, in the same process.
    assert a["lora"].keys() == b["lora"].keys()
    for key in a["lora"]:
        assert torch.equal(a["lora"][key], b["lora"][key]), key
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"] == 6
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    # The log was cut back to the checkpoint: every step logged exactly once.
    steps = [r["step"] for r in map(json.loads, (tmp_path / "crashed" / "log.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 7))
    # keep_checkpoints=2 and the final adapter is the same file content as the straight run's.
    assert [p.name for p in list_checkpoints(tmp_path / "crashed")] == ["step-00000003", "step-00000006"]
    ta, _ = read_state_dict(tmp_path / "straight" / ADAPTER_FILE)
    tb, _ = read_state_dict(tmp_path / "crashed" / ADAPTER_FILE)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # the same weights folded by the same operations
    for name in ("config.json", "curves.png", "previews/step-00000006.png"):
        assert (tmp_path / "crashed" / name).is_file(), name


def test_stop_after_and_a_different_configuration(tiny_base, world, tmp_path):
    config = tiny_config(tiny_base, world, tmp_path / "run", max_steps=4, checkpoint_every=0)
    result = train(config, stop_after=2)
    assert result.step == 2 and result.adapter is None
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    with pytest.raises(ValueError, match=r"configuration differs .*learning_rate: 0\.01 -> 0\.02"):
        train(replace(config, learning_rate=0.02), resume="latest")
    assert train(config, resume="latest").step == 4


def test_the_adapter_file_loads_and_predicts_like_the_training_unet(tiny_base, world, tmp_path):
    """rank 2 with alpha 6 (scale 3, folded into the file): engine file == live peft adapter."""
    config = tiny_config(tiny_base, world, tmp_path / "run", task="normal",
                         train_targets=str(world / "normal"), lora_alpha=6.0, max_steps=2, checkpoint_every=0)
    result = train(config)
    tensors, metadata = read_state_dict(result.adapter)
    facts = {k: json.loads(v) for k, v in metadata.items() if k.startswith("dmp.")}
    assert facts == {"dmp.task": "normal", "dmp.prediction_type": "v_prediction", "dmp.uses_prompts": False,
                     "dmp.target_scale": 1.0, "dmp.normal_convention": "omnidata",
                     "dmp.base_model": tiny_base.name, "dmp.rank": 2, "dmp.self_attn_only": False,
                     "dmp.steps_trained": 2}
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    live = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    add_lora(live.unet, config)
    load_lora_state_dict(live.unet, final_state(tmp_path / "run")["lora"])
    live.register_adapter("default", DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
                          .load_adapter(result.adapter))
    engine = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    info = engine.load_adapter(tmp_path / "run")  # the run folder is a DMP-layout adapter folder
    assert (info.task, info.rank, info.steps_trained) == ("normal", 2, 2)
    a = live.predict(images, "default", steps=2, processing_resolution=0)
    b = engine.predict(images, "run", steps=2, processing_resolution=0)
    # Float rounding only: (3 B) A vs 3 (B A), and peft's live layers against merged weights. Normals are
    # renormalised, which magnifies rounding where the decoded vector is short (3e-5 measured, 2 threads);
    # an adapter that is not the trained one moves them by ~1 (below).
    torch.testing.assert_close(a.raw, b.raw, atol=1e-3, rtol=0)
    assert not torch.allclose(b.raw, engine.predict(images, "run", steps=2, processing_resolution=0,
                                                    prediction_type="sample").raw)  # the adapter matters


def test_adapter_keys_are_what_comfyuis_lora_loader_maps(tiny_base, world, tmp_path):
    """ComfyUI (comfy/lora.py, model_lora_keys_unet) maps every diffusers attention weight 'X.to_q.weight' of
    an SD 1.x UNet to the LoRA prefix 'X.processor.to_q' ('.to_out.0' -> '.processor.to_out') and reads
    '{prefix}_lora.up.weight' / '_lora.down.weight' with scale 1 when no '{prefix}.alpha' is present."""
    config = tiny_config(tiny_base, world, tmp_path / "run", max_steps=1, checkpoint_every=0, lora_alpha=4.0)
    result = train(config)
    tensors, _ = read_state_dict(result.adapter)
    unet = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32").unet
    expected = {}
    for name, module in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            for projection in ATTENTION_PROJECTIONS:
                layer = module.get_submodule(projection)
                prefix = f"{name}.processor.{projection.removesuffix('.0')}"
                expected[f"{prefix}_lora.up.weight"] = (layer.out_features, 2)
                expected[f"{prefix}_lora.down.weight"] = (2, layer.in_features)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected  # nothing unmapped, no alphas
    state = final_state(tmp_path / "run")["lora"]
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"
    folded = tensors["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight"]
    torch.testing.assert_close(folded, state[f"{key}.lora_B.weight"] * 2.0)  # alpha 4 / rank 2


def test_bad_input_fails_before_training(tiny_base, world, tmp_path):
    config = tiny_config(tiny_base, world, tmp_path / "run")
    with pytest.raises(ValueError, match="not depth targets"):
        train(replace(config, train_targets=str(world / "normal")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        train(replace(config, train_images=str(tmp_path / "empty")))
    not_sd1 = tmp_path / "sdxl"
    (not_sd1 / "unet").mkdir(parents=True)
    (not_sd1 / "vae").mkdir()
    (not_sd1 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="Stable Diffusion 1.x"):
        train(replace(config, base=str(not_sd1)))
    with pytest.raises(FileNotFoundError, match="resume"):
        train(config, resume=tmp_path / "nowhere")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_killed_process_resumes_and_leaves_no_corrupt_file(tiny_base, world, tmp_path):
    """SIGKILL at a random moment after the first checkpoint; every checkpoint left is complete."""
    out = tmp_path / "run"
    args = train_argv(tiny_base, world, out, "--max-steps", "400", "--checkpoint-every", "1",
                      "--keep-checkpoints", "2", "--val-limit", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "training", "train", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(list_checkpoints(out)) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.3)  # somewhere in a step or in writing a checkpoint
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
        process.stderr.close()
    left = list_checkpoints(out)
    assert left, "no checkpoint survived"
    for folder in left:  # every published checkpoint is complete and readable
        assert load_checkpoint(folder)["step"] == int(folder.name.split("-")[1])
        read_state_dict(folder / ADAPTER_FILE)
    last = load_checkpoint(left[-1])["step"]
    resume = ["--resume", "latest", "--stop-after", str(last + 2)]
    done = subprocess.run([sys.executable, "-m", "training", "train", *args, *resume], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(list_checkpoints(out)[-1])["step"] == last + 2
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the killed run's leftovers were cleaned up


def test_captions_train_a_prompted_adapter(tiny_base, world, tmp_path):
    """metadata.jsonl captions through the base's tokenizer and text encoder; validation uses guidance."""
    config = tiny_config(tiny_base, world, tmp_path / "run", captions=True, max_steps=2, checkpoint_every=0)
    result = train(config)
    _, metadata = read_state_dict(result.adapter)
    assert json.loads(metadata["dmp.uses_prompts"]) is True
    assert set(result.metrics) == {"abs_rel", "delta1"}


@pytest.mark.parametrize("task, folder", [("segmentation", "segmentation"), ("albedo", "albedo"),
                                          ("shading", "shading"), ("rgb", "albedo")])
def test_validation_of_every_task(tiny_base, world, tmp_path, task, folder):
    """Metrics and a preview grid for each task, through the engine's predict."""
    config = tiny_config(tiny_base, world, tmp_path, task=task, train_targets=str(world / folder),
                         val_split=3)
    _, val_set = build_datasets(config)
    model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    add_lora(model.unet, config)
    model.register_adapter("default", adapter_info(config))
    metrics = validate(model, load_validation(val_set, 3), config, tmp_path / "preview.png")
    assert all(v == v for v in metrics.values()) and metrics  # no NaN
    with Image.open(tmp_path / "preview.png") as preview:
        assert preview.size == (3 * 32, 2 * 32)  # input | prediction | truth, val_previews=2 rows


def test_without_validation_pairs(tiny_base, world, tmp_path):
    config = tiny_config(tiny_base, world, tmp_path / "run", val_split=0, max_steps=1, checkpoint_every=0)
    result = train(config)
    assert result.adapter.is_file() and result.metrics == {}


def test_register_adapter_makes_a_live_peft_adapter_usable(tiny_base):
    """dmp_model.DMPModel.register_adapter (added for the trainer): predictions follow the live weights."""
    model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    config = TrainConfig(base="b", train_images="i", train_targets="t", rank=2)
    with pytest.raises(ValueError, match="no LoRA layers of adapter 'default'"):
        model.register_adapter("default", adapter_info(config))
    add_lora(model.unet, config)
    with pytest.raises(TypeError, match="AdapterInfo"):
        model.register_adapter("default", {"task": "depth"})
    assert model.register_adapter("default", adapter_info(config)).task == "depth"
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = model.predict(images, steps=1, processing_resolution=0).raw
    for name, parameter in model.unet.named_parameters():
        if "lora_B" in name:
            parameter.data.fill_(0.05)
    assert not torch.equal(before, model.predict(images, steps=1, processing_resolution=0).raw)


_KILL_WHILE_REPLACING = """
import os, shutil, sys
from training import resume as checkpoints
out, kill_at = sys.argv[1], sys.argv[2]
checkpoints.save_checkpoint(out, {"step": 5, "tag": "old"})
real_rename, real_rmtree = os.rename, shutil.rmtree

def rename(source, target):
    if kill_at == "publishing" and os.path.basename(source).startswith(".tmp-"):
        os._exit(9)  # SIGKILL-like: no handler, no cleanup
    real_rename(source, target)

def rmtree(path, *args, **kwargs):
    if kill_at == "deleting" and os.path.basename(path).startswith(".old-"):
        os._exit(9)
    real_rmtree(path, *args, **kwargs)

os.rename, shutil.rmtree = rename, rmtree
checkpoints.save_checkpoint(out, {"step": 5, "tag": "new"})
"""


@pytest.mark.parametrize("kill_at, survivor", [("publishing", "old"), ("deleting", "new")])
def test_a_kill_while_replacing_a_checkpoint_keeps_that_step(tmp_path, kill_at, survivor):
    """Writing a step again: killed before the new folder is in place, the old one comes back on the next
    start; killed after, the new one stays. Either way the step survives and no hidden folder is left."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _KILL_WHILE_REPLACING, str(tmp_path), kill_at], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr[-2000:]
    recover_interrupted(tmp_path)  # what the next start does first
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005"]
    assert load_checkpoint(list_checkpoints(tmp_path)[0])["tag"] == survivor
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000005"]


def test_replacing_a_checkpoint_that_fails_restores_the_old_one(tmp_path):
    save_checkpoint(tmp_path, {"step": 2, "tag": "old"})

    def broken_adapter(folder):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, {"step": 2, "tag": "new"}, broken_adapter)
    assert load_checkpoint(list_checkpoints(tmp_path)[0])["tag"] == "old"
    save_checkpoint(tmp_path, {"step": 2, "tag": "new"})
    assert load_checkpoint(list_checkpoints(tmp_path)[0])["tag"] == "new"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]


def test_validation_conditions_as_the_engine_runs_the_adapter(tiny_base, world, tmp_path):
    """A prompted adapter (--captions) is validated with each caption and guidance, a -notext one with the
    empty prompt: the same predictions DMPModel.predict gives for an adapter with those facts."""
    conditioned = {}
    for captions in (False, True):
        config = tiny_config(tiny_base, world, tmp_path, captions=captions, val_split=2)
        _, val_set = build_datasets(config, log=False)
        val = load_validation(val_set, 2)
        assert all(val.captions) == captions  # read only for a prompted adapter; the world has one per image
        model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
        add_lora(model.unet, config)
        model.register_adapter(ADAPTER_NAME, adapter_info(config))
        metrics = validate(model, val, config, None)
        expected = TaskMetrics("depth")
        # validate's own call (batch_size 8: both images in one batch) on the same model: the same operations,
        # so the metrics agree exactly.
        prediction = model.predict(val.images, ADAPTER_NAME, steps=config.val_steps, processing_resolution=0,
                                   batch_size=8, prompt=val.captions if captions else None).raw
        expected.update(prediction, val.raws)
        assert metrics == expected.compute(), captions
        conditioned[captions] = prediction
    assert not torch.allclose(conditioned[False], conditioned[True])  # the prompts did reach the prompted one


def test_no_flip_normals_keeps_flips_for_other_tasks_only(tiny_base, world, tmp_path, monkeypatch):
    """--no-flip-normals (the paper's recipe for normals): the normal run draws no flip, a depth run still does."""
    import training.trainer as trainer_module

    plans = []

    class RecordingPlan(trainer_module.SamplePlan):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            plans.append(self)

    monkeypatch.setattr(trainer_module, "SamplePlan", RecordingPlan)
    for task in ("normal", "depth"):
        config = tiny_config(tiny_base, world, tmp_path / task, task=task, train_targets=str(world / task),
                             flip_normals=False, max_steps=1, checkpoint_every=0, val_split=0)
        train(config)
    normal_plan, depth_plan = plans
    assert not any(flip for step in range(4) for _, flip in normal_plan.batch(step))
    assert any(flip for step in range(4) for _, flip in depth_plan.batch(step))
