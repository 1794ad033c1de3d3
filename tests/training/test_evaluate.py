"""`dmp evaluate`: metrics against hand-computed values, the grid, tables, resuming, bad input, and the
miniature world's trained adapters against the constant baseline."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dmp_model.adapters import AdapterInfo
from dmp_model.images import load_image
from dmp_model.prediction.predict import Prediction, PredictOptions
from training import evaluate
from training.cli import main as training_main
from training.data import DataError
from training.demo.world import write_dataset
from training.metrics import TaskMetrics, best_constant

DEPTH_INFO = AdapterInfo(task="depth", target_scale=8.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Six 32-px scenes of the miniature world with every target."""
    return write_dataset(tmp_path_factory.mktemp("world") / "val", 6, size=32, seed=5)


def test_depth_metrics_with_and_without_scale_and_shift_alignment():
    truth = torch.tensor([[[1.0, 2.0, 4.0, 0.0]]])  # 0: no ground truth
    prediction = 0.5 * truth + 1  # relative depth: exact after a scale and shift
    metric, aligned = TaskMetrics("depth"), TaskMetrics("depth", depth_alignment="scale_shift")
    metric.update(prediction, truth)
    aligned.update(prediction, truth)
    # 1.5, 2, 3 against 1, 2, 4: ratios 1.5, 1, 1.33, so only the middle pixel is within 1.25
    assert metric.compute() == pytest.approx({"abs_rel": (0.5 / 1 + 0 / 2 + 1 / 4) / 3, "delta1": 1 / 3})
    assert aligned.compute() == pytest.approx({"abs_rel": 0.0, "delta1": 1.0}, abs=1e-6)
    with pytest.raises(ValueError, match=r"depth_alignment must be one of \('none', 'scale_shift'\)"):
        TaskMetrics("depth", depth_alignment="median")


def test_normal_metrics_mean_median_and_share_under_11_25_degrees():
    angles = torch.tensor([0.0, 5.0, 11.0, 30.0, 90.0])
    radians = torch.deg2rad(angles)
    truth = torch.tensor([0.0, 0.0, 1.0]).expand(1, 1, 5, 3)
    prediction = torch.stack([torch.sin(radians), torch.zeros(5), torch.cos(radians)], -1)[None, None]
    metrics = TaskMetrics("normal")
    metrics.update(prediction, truth)
    result = metrics.compute()
    assert result["angular_error_deg"] == pytest.approx(27.2, abs=1e-3)
    assert result["angular_median_deg"] == pytest.approx(11.0, abs=0.01)
    assert result["within_11_25deg"] == pytest.approx(3 / 5)


def test_best_constants_per_task():
    depth = [torch.tensor([[1.0, 2.0], [4.0, 0.0]])]
    # Exact by construction: the AbsRel minimiser is one of the depths (a weighted median, weights 1/d:
    # 1, 0.5, 0.25, and the first passes half of 1.75 by far).
    assert float(best_constant("depth", depth)) == 1.0  # AbsRel 0.42 (0 + 1/2 + 3/4) / 3; 2 m gives 0.5
    ids = [torch.tensor([[3, 3], [5, 0]])]
    assert int(best_constant("segmentation", ids)) == 3
    shading = [torch.tensor([[2.0, 4.0]])]  # min-max normalised as the metric compares: 0, 1
    assert float(best_constant("shading", shading)) == pytest.approx(0.5)


def test_grid_is_every_combination_and_bad_values_are_named():
    settings = evaluate.parse_grid({"steps": ["1", "5"], "spacing": ["leading", "trailing"], "ensemble": ["none"]},
                                   PredictOptions())
    assert [(s.steps, s.spacing) for s in settings] == [(1, "leading"), (1, "trailing"), (5, "leading"),
                                                        (5, "trailing")]
    assert settings[0].key == "steps=1 spacing=leading sampler=ddim processing_resolution=512 tile=off ensemble=none"
    for axes, message in [({"spacing": ["leading", "middle"]}, r"spacing='middle' is invalid; valid values: "
                                                               r"\('leading', 'trailing'\)"),
                          ({"steps": ["five"]}, r"steps='five' is invalid; valid values: integers >= 1"),
                          ({"processing_resolution": ["4"]}, r"processing_resolution='4' is invalid"),
                          ({"tile": ["yes"]}, r"tile='yes' is invalid; valid values: \('off', 'on'\)"),
                          ({"colour": ["red"]}, r"unknown grid axes \['colour'\]"),
                          ({"steps": ["1000"]}, r"grid setting 'steps=1000 .*' is invalid"),
                          ({"tile": ["on"], "processing_resolution": ["0"]}, r"tile=True needs a processing_res")]:
        with pytest.raises(ValueError, match=message):
            evaluate.parse_grid(axes, PredictOptions())


class TruthPredictor:
    """A stand-in predictor that knows the answers: each image's target plus `noise` (relative), or a
    constant when `constant` is given. Counts its calls."""

    def __init__(self, world: Path, noise: float = 0.0, constant: float | None = None):
        self.truth = {load_image(p).numpy().tobytes(): torch.from_numpy(np.load(world / "depth" / f"{p.stem}.npy"))
                      for p in sorted((world / "images").glob("*.png"))}
        self.noise, self.constant, self.calls = noise, constant, 0

    def __call__(self, images, options, prompts):
        self.calls += 1
        truth = torch.stack([self.truth[image.numpy().tobytes()] for image in images])
        if self.constant is not None:
            raw = torch.full_like(truth, self.constant)
        else:
            raw = truth * (1 + self.noise * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0)))
        return Prediction("depth", DEPTH_INFO, raw, torch.zeros(*raw.shape, 3))


def world_config(world: Path):
    return evaluate.reading_config("base", world / "images", world / "depth", DEPTH_INFO)


def test_one_row_per_setting_tables_and_a_good_predictor_beats_the_constant(world, tmp_path):
    config = world_config(world)
    pairs = evaluate.load_pairs(world / "images", world / "depth", config)
    settings = evaluate.parse_grid({"steps": ["1", "5"], "ensemble": ["none", "flip"]}, PredictOptions())
    rows = evaluate.run_evaluation(TruthPredictor(world, noise=0.05), pairs, config, settings, PredictOptions(),
                                   tmp_path, {"adapter": "truth"})
    assert [row["setting"] for row in rows] == ["constant"] + [s.key for s in settings]
    baseline, *predicted = rows
    assert all(row["abs_rel"] < baseline["abs_rel"] / 2 and row["images"] == 6 for row in predicted)
    assert all(row["seconds_per_image"] >= 0 for row in rows)
    constant_rows = evaluate.run_evaluation(TruthPredictor(world, constant=float(best_constant(
        "depth", [torch.from_numpy(np.load(p.target)) for p in pairs]))), pairs, config, settings[:1],
        PredictOptions(), tmp_path / "constant", {"adapter": "constant"})
    assert constant_rows[1]["abs_rel"] == pytest.approx(baseline["abs_rel"], rel=1e-5)  # the same constant
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["evaluation"]["task"] == "depth" and len(saved["rows"]) == 5
    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["setting"] for r in table] == [r["setting"] for r in rows]
    assert float(table[1]["abs_rel"]) == pytest.approx(rows[1]["abs_rel"])
    with Image.open(tmp_path / "quality.png") as plot:
        assert plot.format == "PNG"
    text = evaluate.format_table(rows, "depth")
    assert len(text.splitlines()) == 6 and "abs_rel ↓" in text and "delta1 ↑" in text


def test_an_interrupted_evaluation_resumes_per_setting(world, tmp_path):
    config = world_config(world)
    pairs = evaluate.load_pairs(world / "images", world / "depth", config)
    settings = evaluate.parse_grid({"steps": ["1", "2", "3"]}, PredictOptions(batch_size=8))

    class Interrupted(TruthPredictor):
        def __call__(self, images, options, prompts):
            if options.steps == 3:
                raise KeyboardInterrupt
            return super().__call__(images, options, prompts)

    with pytest.raises(KeyboardInterrupt):
        evaluate.run_evaluation(Interrupted(world), pairs, config, settings, PredictOptions(batch_size=8), tmp_path,
                                {"adapter": "truth"})
    done = [row["setting"] for row in json.loads((tmp_path / "results.json").read_text())["rows"]]
    assert done == ["constant", settings[0].key, settings[1].key]
    predictor = TruthPredictor(world)
    rows = evaluate.run_evaluation(predictor, pairs, config, settings, PredictOptions(batch_size=8), tmp_path,
                                   {"adapter": "truth"})
    assert predictor.calls == 2 and len(rows) == 4  # one warm-up and one batch: only steps=3 was left
    with pytest.raises(ValueError, match=r"holds another evaluation \(adapter: 'truth' -> 'other'\)"):
        evaluate.run_evaluation(predictor, pairs, config, settings, PredictOptions(), tmp_path, {"adapter": "other"})


def test_targets_of_the_wrong_kind_or_none_are_refused_naming_the_files(world, tmp_path):
    with pytest.raises(DataError, match=r"evaluation targets are not depth targets.*normal/00000.png.*mode 'RGB'"):
        evaluate.load_pairs(world / "images", world / "normal",
                            evaluate.reading_config("base", world / "images", world / "normal", DEPTH_INFO))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="evaluation targets folder .*empty holds no depth targets"):
        evaluate.load_pairs(world / "images", tmp_path / "empty", world_config(world))


def run_cli(caplog, capsys, *argv) -> tuple[int, str, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dmp"):
        code = training_main(["evaluate", *map(str, argv)])
    return code, capsys.readouterr().out, "\n".join(r.getMessage() for r in caplog.records)


def test_dmp_evaluate_on_the_tiny_model(tiny_base, tiny_model, world, tmp_path, caplog, capsys):
    adapter = Path(tiny_base).parent / "adapters" / "depth-test-notext"
    common = ["--base", tiny_base, "--adapter", adapter, "--images", world / "images", "--device", "cpu",
              "--precision", "fp32", "-o", tmp_path / "eval"]
    code, out, log = run_cli(caplog, capsys, *common, "--targets", world / "depth", "--steps", "1", "--limit", "3",
                             "--processing-resolution", "32", "--ensemble", "none", "flip")
    assert code == 0, log
    lines = out.strip().splitlines()
    assert len(lines) == 1 + 1 + 2 and lines[1].startswith("constant")
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert len(rows) == 3 and all(math.isfinite(row["abs_rel"]) and row["images"] == 3 for row in rows)
    code, _, log = run_cli(caplog, capsys, *common, "--targets", world / "normal")
    assert code == 2 and "are not depth targets" in log and "00000.png" in log
    code, _, log = run_cli(caplog, capsys, *common, "--targets", world / "depth", "--sampler", "euler")
    assert code == 2 and "sampler='euler' is invalid; valid values: ('ddim', 'oracle')" in log


@pytest.mark.slow
def test_the_demo_worlds_trained_adapters_beat_the_constant_baseline(tmp_path, caplog, capsys):
    """A shortened `dmp demo` (about two minutes: fewer scenes and steps, a smaller prior, no baselines),
    then `dmp evaluate` of its depth and normal adapters (the LoRAs on the prior) on the held-out scenes."""
    from training.demo import DemoSettings, run_demo
    from training.demo.prior import PriorSettings

    prior = PriorSettings(images=256, label_maps=64, vae_steps=250, unet_steps=100)
    settings = DemoSettings(train_scenes=96, val_scenes=8, ood_scenes=8, prior=prior, depth_steps=120,
                            normal_steps=120, baselines=False)
    summary = run_demo(tmp_path / "demo", settings, cache_dir=tmp_path / "prior-cache")
    world = tmp_path / "demo" / "world" / "val"
    for task, metric in (("depth", "abs_rel"), ("normal", "angular_error_deg")):
        code, _, log = run_cli(caplog, capsys, "--base", summary["prior"]["base"], "--adapter",
                               tmp_path / "demo" / "runs" / "prior_lora" / task, "--images", world / "images",
                               "--targets", world / task, "--device", "cpu", "--precision", "fp32",
                               "--processing-resolution", "0",
                               "--steps", "1", "5", "-o", tmp_path / f"eval-{task}")
        assert code == 0, log
        baseline, *rows = json.loads((tmp_path / f"eval-{task}" / "results.json").read_text())["rows"]
        assert all(row[metric] < baseline[metric] for row in rows), (task, baseline, rows)
