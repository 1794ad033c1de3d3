"""Configuration: validation messages, files, flags, the comparison used on resume; metrics and plots."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import pytest
import torch

from dmp_model.adapters import ATTENTION_PROJECTIONS
from training.cli import add_train_arguments, config_from_args
from training.config import TrainConfig, config_differences, config_from_dict
from training.metrics import (
    HIGHER_IS_BETTER,
    MAIN_METRIC,
    METRICS,
    TaskMetrics,
    best_constant_depth,
    best_constant_depth_map,
    constant_depth_abs_rel,
)
from training.plot import plot_curves

REQUIRED = dict(base="base", train_images="img", train_targets="tgt")


def parse(argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_defaults_follow_the_paper():
    config = TrainConfig(**REQUIRED)
    assert (config.rank, config.learning_rate, config.batch_size, config.resolution) == (4, 1e-4, 8, 512)
    assert config.prediction_type == "v_prediction" and config.lr_scheduler == "cosine"
    assert config.target_modules == ("to_q", "to_k", "to_v", "to_out.0") and config.resolved_lora_alpha == 4
    assert config.target_modules == tuple(ATTENTION_PROJECTIONS)  # the engine's list, not a copy
    assert config.resolved_target_scale == 8.0
    assert TrainConfig(**REQUIRED, task="normal").resolved_target_scale == 1.0


@pytest.mark.parametrize("changes, message", [
    ({"task": "height"}, r"task must be one of \("),
    ({"resolution": 500}, "resolution must be a multiple of 8"),
    ({"rank": 0}, "rank must be an integer >= 1, got 0"),
    ({"learning_rate": -1.0}, r"learning_rate must be a finite number > 0, got -1.0"),
    ({"warmup_steps": 20, "max_steps": 10}, r"warmup_steps \(20\) must not exceed max_steps \(10\)"),
    ({"target_modules": ("to_q", "ff")}, "target_modules must be one of"),
    ({"val_images": "v"}, "give both val_images and val_targets"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
])
def test_bad_values_name_field_value_and_expectation(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**REQUIRED, **changes})


def test_required_paths_are_named():
    with pytest.raises(ValueError, match="train_images is required .* --train-images"):
        TrainConfig(base="b", train_targets="t")


def test_flags_override_the_config_file(tmp_path):
    (tmp_path / "run.toml").write_text('[train]\nbase = "b"\ntrain_images = "i"\ntrain-targets = "t"\n'
                                       'max_steps = 7\nlearning_rate = 1\nflip = false\n')
    config = parse(["--config", str(tmp_path / "run.toml"), "--max-steps", "9",
                    "--target-modules", "to_q", "to_v"])
    assert (config.max_steps, config.learning_rate, config.flip) == (9, 1.0, False)
    assert config.target_modules == ("to_q", "to_v")
    (tmp_path / "run.json").write_text(json.dumps({**REQUIRED, "ranks": 3}))
    with pytest.raises(ValueError, match="unknown configuration key 'ranks'"):
        parse(["--config", str(tmp_path / "run.json")])
    assert parse([f"--{k.replace('_', '-')}={v}" for k, v in REQUIRED.items()] + ["--no-flip"]).flip is False


def test_flips_per_task():
    """--flip for all tasks; normals too (x negated) unless --no-flip-normals, the paper's recipe."""
    assert TrainConfig(**REQUIRED, task="normal").flips
    assert not TrainConfig(**REQUIRED, task="normal", flip_normals=False).flips
    assert TrainConfig(**REQUIRED, task="depth", flip_normals=False).flips
    assert not TrainConfig(**REQUIRED, task="depth", flip=False).flips
    assert parse([f"--{k.replace('_', '-')}={v}" for k, v in REQUIRED.items()] + ["--no-flip-normals"]
                 ).flip_normals is False


def test_a_setting_added_later_counts_as_its_default_on_resume():
    config = TrainConfig(**REQUIRED).resolved()
    older = {k: v for k, v in config.to_dict().items() if k != "flip_normals"}  # saved before it existed
    assert config_differences(older, config) == []
    assert config_differences(older, replace(config, flip_normals=False)) == ["flip_normals: True -> False"]


def test_config_round_trips_through_json_and_reports_differences():
    config = TrainConfig(**REQUIRED, max_steps=5).resolved()
    saved = json.loads(json.dumps(config.to_dict()))
    assert config_from_dict(saved) == config
    assert config_differences(saved, config) == []
    other = config_from_dict({**saved, "rank": 8})
    assert config_differences(saved, other) == ["rank: 4 -> 8"]


def test_depth_metrics_and_the_best_constant():
    truth = torch.tensor([[1.0, 2.0], [4.0, 0.0]])  # 0 = no ground truth
    metrics = TaskMetrics("depth")
    metrics.update(torch.tensor([[1.1, 2.0], [2.0, 9.0]]), truth)
    result = metrics.compute()
    assert result["abs_rel"] == pytest.approx((0.1 + 0 + 0.5) / 3)
    assert result["delta1"] == pytest.approx(2 / 3)
    generator = torch.Generator().manual_seed(0)
    depth = torch.rand(1000, generator=generator) * 6 + 1
    c, abs_rel = constant_depth_abs_rel(depth)
    grid = torch.linspace(1, 7, 2001, dtype=torch.float64)  # float64 as the metric: rounding ~1e-16, not 1e-7
    brute = ((grid[:, None] - depth.double()[None]).abs() / depth.double()[None]).mean(1)
    assert abs_rel <= brute.min().item() + 1e-6  # no constant does better
    assert c == best_constant_depth(depth)  # the same function on the same values: exact
    maps = torch.rand(20, 2, 3, generator=generator) * 5 + 1
    layout = best_constant_depth_map(maps)  # the same minimiser, per pixel
    for i, j in [(i, j) for i in range(2) for j in range(3)]:
        assert layout[i, j] == pytest.approx(best_constant_depth(maps[:, i, j]))


def test_other_metrics():
    normal = TaskMetrics("normal")
    truth = torch.tensor([[[0.0, 0.0, -1.0], [0.0, -1.0, 0.0]]])
    normal.update(torch.tensor([[[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]]]), truth)
    assert normal.compute()["angular_error_deg"] == pytest.approx(45.0)
    seg = TaskMetrics("segmentation")
    seg.update(torch.tensor([[0, 0, 3, 3]]), torch.tensor([[0, 3, 3, 3]]))
    assert seg.compute()["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    shading = TaskMetrics("shading")
    shading.update(torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 4.0]]))  # truth min-max normalised
    assert shading.compute()["mse"] == pytest.approx(0.0)  # exact: (2 - 2) / 2 = 0 and (4 - 2) / 2 = 1
    assert math.isnan(TaskMetrics("albedo").compute()["mse"])


def test_main_metrics_and_their_direction():
    """A perfect prediction must score better than a wrong one in each metric's stated direction
    (mIoU, pixel accuracy and delta1 higher, errors lower)."""
    generator = torch.Generator().manual_seed(1)
    truths = {"depth": torch.full((1, 4, 4), 2.0),
              "normal": torch.nn.functional.normalize(torch.rand(1, 4, 4, 3, generator=generator) + 0.1, dim=-1),
              "segmentation": torch.arange(16).view(1, 4, 4) % 3,
              "albedo": torch.rand(1, 4, 4, 3, generator=generator),
              "shading": torch.rand(1, 4, 4, generator=generator), "rgb": torch.rand(1, 4, 4, 3, generator=generator)}
    wrongs = {"depth": torch.full((1, 4, 4), 5.0), "normal": -truths["normal"],
              "segmentation": (truths["segmentation"] + 1) % 3, "albedo": 1 - truths["albedo"],
              "shading": 1 - truths["shading"], "rgb": 1 - truths["rgb"]}
    assert set(MAIN_METRIC) == set(METRICS) and all(MAIN_METRIC[t] in METRICS[t] for t in METRICS)
    for task, truth in truths.items():
        perfect, wrong = TaskMetrics(task), TaskMetrics(task)
        perfect.update(truth, truth)
        wrong.update(wrongs[task], truth)
        for name in METRICS[task]:
            good, bad = perfect.compute()[name], wrong.compute()[name]
            assert (good > bad) if name in HIGHER_IS_BETTER else (good < bad), (task, name, good, bad)


def test_plot_is_a_png(tmp_path):
    from PIL import Image

    path = plot_curves(tmp_path / "curves.png", [("loss", {"loss": [(1, 1.0), (2, 0.5), (3, 0.2)]}, True),
                                                  ("metric", {"abs_rel": []}, False)])
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[1] > image.size[0] / 2


def test_dmp_command_discovers_train_and_demo(monkeypatch, capsys):
    """`dmp` finds `train` and `demo` through the "dmp.commands" entry points (see pyproject.toml)."""
    import dmp_model.cli.main
    from training.cli import register_demo, register_train

    class Entry:
        def __init__(self, function):
            self.function = function

        def load(self):
            return self.function

    entries = [Entry(register_train), Entry(register_demo)]
    monkeypatch.setattr(dmp_model.cli.main, "entry_points",
                        lambda group: entries if group == "dmp.commands" else [])
    for command, flag in (("train", "--resume"), ("demo", "--overwrite")):
        with pytest.raises(SystemExit) as exit_info:
            dmp_model.cli.main.main([command, "--help"])
        assert exit_info.value.code == 0 and flag in capsys.readouterr().out
    bad = ["train", "--base", "b", "--train-images", "missing", "--train-targets", "t"]
    assert dmp_model.cli.main.main(bad) == 2  # reported as an error, before anything loads
