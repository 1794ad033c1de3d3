"""`dmp demo`'s orchestration: the job schedule, the folder rules, the claims, the table and the log; and
(slow) the whole demo at a tiny size, twice, the second time on the cached prior."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from training.demo import run as demo
from training.demo.prior import PriorSettings
from training.demo.run import CLAIMS, DemoSettings, Job, check_claims, markdown_table, run_jobs


def _job(name: str, code: str, after: tuple[str, ...] = ()) -> Job:
    return Job(name, [sys.executable, "-c", code], after)


# A job: says it started, notes whether job `done` had ended by then, waits (up to 60 s) for job `meet`
# to start, notes whether it did, and says it ended. No clocks: a slow machine only makes it slower.
RENDEZVOUS = """
import os, sys, time
me, done, meet = sys.argv[1:4]
ended_before = not done or os.path.exists(done + ".end")
open(me + ".start", "w").close()
deadline = time.monotonic() + 60
while meet and not os.path.exists(meet + ".start") and time.monotonic() < deadline:
    time.sleep(0.01)
met = not meet or os.path.exists(meet + ".start")
with open(me + ".end", "w") as f:
    f.write(f"{ended_before} {met}")
"""


def test_jobs_run_in_parallel_after_their_dependencies(tmp_path):
    """Two workers: a and b overlap; c starts only after a, d only after c."""
    def job(name: str, after: tuple[str, ...] = (), meet: str = "") -> Job:
        paths = [str(tmp_path / n) if n else "" for n in (name, after[0] if after else "", meet)]
        return Job(name, [sys.executable, "-c", RENDEZVOUS, *paths], after)

    # a waits for b to start and b for a: both finish only if they ran at the same time.
    jobs = [job("a", meet="b"), job("b", meet="a"), job("c", ("a",)), job("d", ("c",))]
    seconds = run_jobs(jobs, 2, tmp_path)
    assert set(seconds) == {"a", "b", "c", "d"}
    notes = {name: (tmp_path / f"{name}.end").read_text() for name in "abcd"}
    assert notes["a"] == notes["b"] == "True True"  # a and b overlapped
    assert notes["c"] == notes["d"] == "True True"  # c started after a had ended, d after c
    assert (tmp_path / "a.log").is_file()


def test_a_failed_job_stops_the_others_and_names_its_log(tmp_path):
    started = time.perf_counter()
    jobs = [_job("slow", "import time; time.sleep(60)"), _job("bad", "import sys; print('boom'); sys.exit(3)"),
            _job("later", "pass", after=("bad",))]
    with pytest.raises(RuntimeError, match=r"bad process failed \(exit 3\).*bad\.log.*boom"):
        run_jobs(jobs, 2, tmp_path)
    assert time.perf_counter() - started < 30  # the slow job was killed, not waited for
    assert not (tmp_path / "later.log").exists()


def test_a_job_waiting_for_an_unknown_job_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="wait for jobs that never run"):
        run_jobs([_job("orphan", "pass", after=("missing",))], 2, tmp_path)


def test_the_schedule_trains_each_run_on_the_same_labels_and_the_prior_runs_wait_for_the_prior(tmp_path):
    """One `dmp train` job per (run, task): the full fine-tune on its own tasks only; every job reads the
    same labelled folders with the same steps; only the prior's LoRA waits for the prior's UNet job."""
    (tmp_path / "logs").mkdir()
    prior_job = Job("prior_unet", ["true"])
    settings = DemoSettings()
    jobs = demo.training_jobs(tmp_path, settings, tmp_path / "prior", [prior_job])
    assert [job.name for job in jobs] == ["prior_lora_depth", "prior_lora_normal", "full_finetune_depth",
                                          "random_unet_lora_depth", "random_unet_lora_normal"]
    assert [job.after for job in jobs] == [("prior_unet",)] * 2 + [()] * 3
    configs = {job.name: json.loads((tmp_path / "logs" / f"{job.name}.json").read_text()) for job in jobs}
    for name, config in configs.items():
        task = name.rsplit("_", 1)[1]
        assert config["train_targets"] == str(tmp_path / "world" / "train" / task)
        steps = settings.depth_steps if task == "depth" else settings.normal_steps
        assert config["max_steps"] == steps and config["full_finetune"] == name.startswith("full")
        assert config["base"] == str(tmp_path / ("prior" if name.startswith("prior") else "base-random"))
    only_prior = demo.training_jobs(tmp_path, DemoSettings(baselines=False), tmp_path / "prior", [])
    assert [job.name for job in only_prior] == ["prior_lora_depth", "prior_lora_normal"]


def test_settings_must_agree_with_the_prior():
    with pytest.raises(ValueError, match=r"settings.prior.size \(64\) must equal settings.size \(32\)"):
        demo.check_settings(DemoSettings(size=32))
    with pytest.raises(ValueError, match="workers must be at least 1"):
        demo.check_settings(DemoSettings(workers=0))


def _split(abs_rel, constant=0.3, layout=0.15, random=None):
    depth = {"best_constant_m": 3.0, "best_constant_abs_rel": constant, "layout_prior_abs_rel": layout,
             "dmp_default": {"abs_rel": abs_rel, "delta1": 0.8, "improvement_over_constant": constant / abs_rel}}
    normal = {"mean_normal_angular_error_deg": 50.0, "dmp_default": {"angular_error_deg": 20.0}}
    if random is not None:
        depth["random_unet_lora"] = {"abs_rel": random, "delta1": 0.7}
        normal["random_unet_lora"] = {"angular_error_deg": 25.0}
    return {"depth": depth, "normal": normal}


@pytest.mark.parametrize("in_domain, ood, failed", [
    (0.12, 0.18, []),
    (0.16, 0.18, ["in_domain_2x_best_constant"]),  # 0.3 / 0.16 < 2
    (0.14, 0.18, []),  # 0.14 > 0.9 x the layout prior's 0.15: the retired bar is no claim
    (0.12, 0.21, ["out_of_domain_beats_random_unet_lora"]),
])
def test_the_claims_are_the_two_the_demo_makes(in_domain, ood, failed):
    summary = {**_split(in_domain, random=0.14), "out_of_domain": _split(ood, random=0.20)}
    claims = check_claims(summary)
    assert set(claims) == set(CLAIMS) == {"in_domain_2x_best_constant", "out_of_domain_beats_random_unet_lora"}
    assert sorted(name for name, ok in claims.items() if not ok) == sorted(failed)


def _finished(in_domain, ood, random=None):
    summary = {**_split(in_domain, random=random and random[0]),
               "out_of_domain": _split(ood, layout=0.20, random=random and random[1])}
    summary["bars"] = check_claims(summary)
    summary["passed"] = all(summary["bars"].values())
    return {**summary, "timings": {"total_s": 239.4}, "prior": {"cached": False}}


def test_the_log_ends_with_the_table_a_line_per_claim_with_its_numbers_and_the_layout_finding(tmp_path, caplog):
    caplog.set_level("INFO", logger=demo.logger.name)
    demo.report(_finished(0.151, 0.206, random=(0.159, 0.209)), tmp_path)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith(" " * 10) and "in domain: depth AbsRel" in lines[0]  # the table's header
    claims, finding, verdict = lines[-4:-2], lines[-2], lines[-1]
    assert claims[0] == ("claim: in domain, at least 2x better than the best constant depth: AbsRel 0.151 against "
                         "0.300: 1.99x: NOT held")  # 0.3 / 0.151 = 1.987
    assert claims[1] == ("claim: out of domain, the LoRA on the prior beats the same LoRA on a random UNet: AbsRel "
                         "0.206 against 0.209: held")
    assert "in domain 0.151 against 0.150 (1% worse); out of domain 0.206 against 0.200 (3% worse)" in finding
    assert finding.startswith("finding: ") and "not a claim" in finding
    assert verdict.startswith("1 of 2 claims held (not held: in_domain_2x_best_constant) in 239 s (prior built)")
    assert not any("FAIL" in line for line in lines)


def test_a_demo_without_the_random_unet_claims_only_what_it_measured(tmp_path, caplog):
    summary = _finished(0.12, 0.2)  # baselines=False: no random-UNet LoRA
    assert summary["bars"] == {"in_domain_2x_best_constant": True} and summary["passed"]
    caplog.set_level("INFO", logger=demo.logger.name)
    demo.report(summary, tmp_path)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[-3].endswith("random UNet: not measured (no random-UNet baseline was trained)")
    assert "(20% better)" in lines[-2] and "out of domain 0.200 against 0.200 (equal)" in lines[-2]
    assert lines[-1].startswith("all 1 claims held in 239 s")
    assert demo.results_text(summary).splitlines()[-3:] == [f"- {line}" for line in lines[-4:-1]]  # results.md


def test_the_table_has_a_row_per_method_and_dashes_where_nothing_applies():
    summary = {**_split(0.12, random=0.14), "out_of_domain": _split(0.18, random=0.20)}
    lines = markdown_table(summary).splitlines()
    assert lines[0].startswith("|  | in domain: depth AbsRel | δ1 | normals | out of domain")
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert set(rows) == {demo.RUN_LABELS["prior_lora"], demo.RUN_LABELS["random_unet_lora"],
                         "best constant depth / mean normal", "per-pixel layout prior (ignores the image)"}
    assert "| 0.120 | 0.800 | 20.0° | 0.180 |" in rows[demo.RUN_LABELS["prior_lora"]]
    assert rows["per-pixel layout prior (ignores the image)"].endswith("| 0.150 | – | – | 0.150 | – | – |")


def test_an_unrelated_folder_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no earlier demo"):
        demo.run_demo(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


TINY_PRIOR = PriorSettings(size=32, images=12, label_maps=4, vae_steps=20, vae_batch=4, unet_width=32, unet_steps=10,
                           unet_batch=4, unet_warmup=2, threads=1)
TINY_DEMO = DemoSettings(size=32, train_scenes=8, val_scenes=4, ood_scenes=4, prior=TINY_PRIOR, depth_steps=4,
                         normal_steps=4, batch_size=4, rank=2)


@pytest.mark.slow
def test_the_whole_demo_twice_the_second_time_on_the_cached_prior(tmp_path):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    first = demo.run_demo(out, TINY_DEMO, cache_dir=cache)
    assert first["prior"]["cached"] is False and "prior_unet_s" in first["timings"]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("abs_rel", "delta1"):
        assert key in metrics["depth"]["dmp_default"] and key in metrics["out_of_domain"]["depth"]["full_finetune"]
    for name in ("best_constant_abs_rel", "layout_prior_abs_rel"):
        assert name in metrics["depth"] and name in metrics["out_of_domain"]["depth"]
    assert set(metrics["bars"]) == {"in_domain_2x_best_constant", "out_of_domain_beats_random_unet_lora"}
    assert metrics["passed"] == all(metrics["bars"].values())
    assert (out / "results.png").is_file() and "same LoRA, random UNet" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match="pass --overwrite"):
        demo.run_demo(out, TINY_DEMO, cache_dir=cache)

    second = demo.run_demo(out, TINY_DEMO, overwrite=True, cache_dir=cache)
    assert second["prior"]["cached"] is True and "prior_unet_s" not in second["timings"]
    # Same prior files, same seeds, the same single-threaded training processes: the same float ops, so the
    # same numbers (rel=1e-4 is slack, not a rounding budget).
    assert second["depth"]["dmp_default"] == pytest.approx(first["depth"]["dmp_default"], rel=1e-4)
    assert Path(second["prior"]["base"]) == Path(first["prior"]["base"])
