"""Scale-out: `accelerate launch` with two CPU processes (gloo) trains one adapter, written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_args import train_argv
from training.demo.world import write_dataset
from training.resume import list_checkpoints, load_checkpoint
from training.trainer import ADAPTER_FILE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("world") / "train", 10, size=32, seed=0)


def test_two_cpu_processes_share_the_data_and_write_one_adapter(tiny_base, world, tmp_path):
    out = tmp_path / "run"
    args = train_argv(tiny_base, world, out, "--max-steps", "4", "--checkpoint-every", "2", "--val-limit", "2",
                      "--log-every", "1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", "-m", "training", "train", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # two processes on the CPU (gloo), not two on one GPU
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / ADAPTER_FILE).is_file()
    state = load_checkpoint(list_checkpoints(out)[-1])
    assert state["step"] == 4 and state["world_size"] == 2
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # one writer: no line twice
    # 2 processes x batch 2 x 4 steps = 16 samples of the 8 training pairs: two full epochs.
    assert records[[r.get("step") for r in records].index(4)]["epoch"] == pytest.approx(2.0)
    assert not list(out.rglob(".tmp*"))
