"""The GPU benchmark runs end to end on the CPU (its --smoke mode), so it is ready when a GPU is."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpu_benchmark_smoke_mode_reports_every_method_size_and_batch(tmp_path, capsys):
    import bench_gpu

    out = tmp_path / "gpu.json"
    returned = bench_gpu.main(["--smoke", "--json", str(out), "--workdir", str(tmp_path / "work")])
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert (results["device"], results["sizes"], results["batches"]) == ("CPU", [64], [1, 2])
    assert [(row["size"], row["method"]) for row in results["rows"]] == [
        (64, method) for method in ("dmp-5", "dmp-1", "marigold-4", "marigold-1")]
    for row in results["rows"]:
        assert set(row["batches"]) == {"1", "2"}
        for cell in row["batches"].values():
            for key in ("method_s", "bare_s", "ratio", "images_per_s"):  # perf_counter spans of whole UNet calls
                assert math.isfinite(cell[key]) and cell[key] > 0, (row["method"], key)
            assert cell["peak_bytes"] is None  # no GPU memory on the CPU
    # The bare loops do the same maths as the pipelines they are compared with: the same float ops in the
    # same order on the same tensors (LoRA merged as W + up @ down in float32 by both), so 0.0 by
    # construction. The bound only needs to catch different maths: one step fewer or another spacing is
    # off by metres (DMP) and by 0.1 (Marigold, [0, 1]); even the same maths in peft's unmerged order
    # differs by only 2e-5 m.
    assert all(d < 1e-4 for d in results["max_difference_to_bare"].values()), results["max_difference_to_bare"]
    calls = results["unet_call_s"]["64"]
    assert set(calls) == {"merged by hand", "DMPModel (merged in peft)", "peft unmerged"}
    assert results["switch_s"] > 0 and set(results["preview_s"]["64"]) == {"1", "2"}
    table = capsys.readouterr().out
    for method in ("dmp-5", "dmp-1", "marigold-4", "marigold-1"):
        assert f"  64 {method}" in table
    assert "img/s b2" in table and "ratio b2" in table


def test_gpu_benchmark_without_cuda_says_how_to_check_it(tmp_path, monkeypatch):
    import bench_gpu
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--smoke"):
        bench_gpu.main(["--json", str(tmp_path / "gpu.json")])
