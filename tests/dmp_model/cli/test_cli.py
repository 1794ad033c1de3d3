"""`dmp predict` end to end on the tiny base: outputs, resuming, failures, formats, and sharding over processes."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from cli_args import predict_argv
from dmp_model import DMPModel
from dmp_model.cli import main as cli
from dmp_model.io.writers import read_depth_png16
from dmp_model.tasks.palettes import palette
from factories import write_official_adapter

ROOT = Path(__file__).resolve().parents[3]
IMAGES = {"a.png": (16, 24), "b.png": (24, 16), "sub/c.png": (16, 16), "sub/d.jpg": (20, 28), "sub/deep/e.png": (8, 8)}
DONE = re.compile(r"process (\d+)/(\d+): (\d+) written, (\d+) skipped \(already there\), (\d+) failed")


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    folder = tmp_path_factory.mktemp("cli-adapters")
    return {name: write_official_adapter(unet, folder / name, seed=seed, scale=0.3)
            for seed, name in enumerate(("depth-a-notext", "normal-b-notext", "seg-c-notext"), start=50)}


def write_images(folder: Path, images: dict = IMAGES) -> Path:
    for i, (name, (height, width)) in enumerate(images.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        array = (np.random.default_rng(i).random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(array).save(path)
    return folder


def args_for(tiny_base, adapters, inputs, output, *extra, names=("depth-a-notext", "normal-b-notext")) -> list[str]:
    return predict_argv(tiny_base, inputs, output, [adapters[name] for name in names],
                        "--processing-resolution", "0", "--steps", "2", *extra)


def run(caplog, argv) -> tuple[int, list[tuple[int, ...]], str]:
    """main(argv): exit code, the (rank, world, written, skipped, failed) summaries, all log text."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dmp"):
        code = cli.main(argv)
    text = "\n".join(r.getMessage() for r in caplog.records)
    return code, [tuple(map(int, m)) for m in DONE.findall(text)], text


def stems() -> list[str]:
    return [str(Path(name).with_suffix("")) for name in IMAGES]


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_writes_every_output_and_matches_the_library(tiny_base, adapters, tmp_path, caplog):
    images, out = write_images(tmp_path / "images"), tmp_path / "out"
    code, summaries, _ = run(caplog, args_for(tiny_base, adapters, [images], out))
    assert code == 0 and summaries == [(1, 1, 5, 0, 0)]
    expected = set()
    for stem in stems():
        expected |= {f"depth-a-notext/{stem}.npy", f"depth-a-notext/{stem}_depth16.png",
                     f"depth-a-notext/{stem}_visual.png", f"normal-b-notext/{stem}.npy",
                     f"normal-b-notext/{stem}_visual.png"}
    assert set(snapshot(out)) == expected  # nothing else: no temp files, no PNG for normals
    model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32",
                                     adapters=[adapters["depth-a-notext"], adapters["normal-b-notext"]])
    for name, (height, width) in IMAGES.items():
        stem = Path(name).with_suffix("")
        depth = np.load(out / "depth-a-notext" / f"{stem}.npy")
        normals = np.load(out / "normal-b-notext" / f"{stem}.npy")
        assert depth.shape == (height, width) and depth.dtype == np.float32
        assert normals.shape == (height, width, 3)
        np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-5)
        png, info = read_depth_png16(out / "depth-a-notext" / f"{stem}_depth16.png")
        # Rounding to whole millimetres is off by at most 0.5 mm; reading the count back as float32 metres
        # adds at most half a float32 step at that depth (np.spacing, a whole step, bounds it).
        slack = float(np.spacing(np.abs(depth).max()))
        assert info["encoding"] == "millimeters" and np.abs(png - depth).max() <= 0.0005 + slack
        with Image.open(out / "depth-a-notext" / f"{stem}_visual.png") as visual:
            assert visual.mode == "RGB" and visual.size == (width, height)
        if name == "sub/c.png":
            # The only 16x16 image, so the CLI predicted it alone: the same batch shape, weights and float ops
            # as this library call, so bit-equal results (the tolerance is slack, not a rounding budget).
            result = model.predict_tasks(images / name, ["depth-a-notext", "normal-b-notext"], steps=2,
                                         processing_resolution=0)
            np.testing.assert_allclose(depth, result["depth-a-notext"].raw[0].numpy(), atol=1e-6)
            np.testing.assert_allclose(normals, result["normal-b-notext"].raw[0].numpy(), atol=1e-6)


def test_a_second_run_skips_and_overwrite_recomputes(tiny_base, adapters, tmp_path, caplog):
    images, out = write_images(tmp_path / "images", {"a.png": (16, 24), "sub/c.png": (8, 16)}), tmp_path / "out"
    assert run(caplog, args_for(tiny_base, adapters, [images], out))[0] == 0
    past = time.time_ns() - 3600 * 10**9
    for path in out.rglob("*.*"):
        os.utime(path, ns=(past, past))
    before = snapshot(out)
    code, summaries, _ = run(caplog, args_for(tiny_base, adapters, [images], out))
    assert code == 0 and summaries == [(1, 1, 0, 2, 0)] and snapshot(out) == before
    code, summaries, _ = run(caplog, args_for(tiny_base, adapters, [images], out, "--overwrite"))
    after = snapshot(out)
    assert code == 0 and summaries == [(1, 1, 2, 0, 0)] and len(after) == 2 * 5
    assert set(after) == set(before) and all(after[k] != before[k] for k in before)


def test_an_unreadable_image_is_reported_and_the_others_are_written(tiny_base, adapters, tmp_path, caplog):
    images, out = write_images(tmp_path / "images"), tmp_path / "out"
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing sensible")
    code, summaries, text = run(caplog, args_for(tiny_base, adapters, [images], out))
    assert code == 1 and summaries == [(1, 1, 5, 0, 1)]
    assert re.search(r"broken\.png: cannot read image", text)
    written = snapshot(out)
    assert not [k for k in written if "broken" in k]
    assert all(f"depth-a-notext/{stem}_visual.png" in written for stem in stems())


@pytest.mark.parametrize("formats", ["npy,jpeg", ",", "NPY"])
def test_bad_formats_exit_2_with_a_message(tiny_base, adapters, tmp_path, caplog, formats):
    images = write_images(tmp_path / "images", {"a.png": (8, 8)})
    code, _, text = run(caplog, args_for(tiny_base, adapters, [images], tmp_path / "out", "--formats", formats))
    assert code == 2
    assert "--formats must be a comma-separated subset of ('npy', 'png', 'exr', 'visual')" in text
    assert not (tmp_path / "out").exists()


def test_same_named_files_from_different_places_exit_2(tiny_base, adapters, tmp_path, caplog):
    write_images(tmp_path / "one", {"photo.png": (8, 8)})
    write_images(tmp_path / "two", {"photo.png": (8, 8)})
    code, _, text = run(caplog, args_for(tiny_base, adapters, [tmp_path / "one" / "photo.png",
                                                               tmp_path / "two" / "photo.png"], tmp_path / "out"))
    assert code == 2 and "would write to the same output names" in text
    # Found through a common parent folder, they keep their relative paths: one/photo and two/photo.
    code, _, _ = run(caplog, args_for(tiny_base, adapters, [tmp_path], tmp_path / "out", "--formats", "npy"))
    assert code == 0
    assert (tmp_path / "out" / "depth-a-notext" / "one" / "photo.npy").is_file()
    assert (tmp_path / "out" / "depth-a-notext" / "two" / "photo.npy").is_file()


def test_missing_input_and_empty_folder_exit_2(tiny_base, adapters, tmp_path, caplog):
    code, _, text = run(caplog, args_for(tiny_base, adapters, [tmp_path / "absent"], tmp_path / "out"))
    assert code == 2 and "input not found" in text
    (tmp_path / "empty").mkdir()
    code, _, text = run(caplog, args_for(tiny_base, adapters, [tmp_path / "empty"], tmp_path / "out"))
    assert code == 2 and "no images found" in text


def test_a_wrong_base_or_adapter_exits_2_with_a_message_not_a_traceback(tiny_base, adapters, tmp_path, caplog):
    images = write_images(tmp_path / "images", {"a.png": (8, 8)})
    argv = args_for(tiny_base, adapters, [images], tmp_path / "out")
    code, _, text = run(caplog, [str(tmp_path / "absent.safetensors") if a == str(tiny_base) else a for a in argv])
    assert code == 2 and "base model not found" in text
    lora = adapters["depth-a-notext"] / "pytorch_lora_weights.safetensors"
    code, _, text = run(caplog, [str(lora) if a == str(tiny_base) else a for a in argv])
    assert code == 2 and "is a LoRA adapter, not a base model" in text
    code, _, text = run(caplog, argv + ["--adapter", str(tmp_path / "no-such-adapter")])
    assert code == 2 and "adapter not found" in text
    copy = tmp_path / "copy" / "depth-a-notext"
    copy.mkdir(parents=True)
    (copy / lora.name).write_bytes(lora.read_bytes())
    code, _, text = run(caplog, argv + ["--adapter", str(copy)])
    assert code == 2 and "adapters must have distinct names" in text
    assert not (tmp_path / "out").exists()


def test_bad_choices_are_argparse_errors(tiny_base, adapters, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args_for(tiny_base, adapters, [tmp_path], tmp_path / "out", "--sampler", "euler"))
    assert exit_info.value.code == 2 and "invalid choice: 'euler'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("OpenEXR") is None, reason="needs the optional OpenEXR package")
def test_exr_outputs_equal_the_npy_values(tiny_base, adapters, tmp_path, caplog):
    import OpenEXR

    images, out = write_images(tmp_path / "images", {"a.png": (16, 24)}), tmp_path / "out"
    code, _, _ = run(caplog, args_for(tiny_base, adapters, [images], out, "--formats", "npy,exr"))
    assert code == 0
    assert sorted(snapshot(out)) == ["depth-a-notext/a.exr", "depth-a-notext/a.npy",
                                     "normal-b-notext/a.exr", "normal-b-notext/a.npy"]
    # Exact by construction: both files hold the same float32 array (EXR FLOAT channels, lossless ZIP).
    depth = OpenEXR.File(str(out / "depth-a-notext" / "a.exr"), separate_channels=True).channels()
    np.testing.assert_array_equal(depth["Y"].pixels, np.load(out / "depth-a-notext" / "a.npy"))
    normals = OpenEXR.File(str(out / "normal-b-notext" / "a.exr"), separate_channels=True).channels()
    np.testing.assert_array_equal(np.stack([normals[c].pixels for c in "RGB"], -1),
                                  np.load(out / "normal-b-notext" / "a.npy"))


def test_segmentation_writes_class_maps(tiny_base, adapters, tmp_path, caplog):
    images, out = write_images(tmp_path / "images", {"room.png": (16, 24)}), tmp_path / "out"
    code, _, _ = run(caplog, args_for(tiny_base, adapters, [images], out, "--formats", "npy,png,exr,visual",
                                      names=("seg-c-notext",)))
    assert code == 0
    assert sorted(snapshot(out)) == ["seg-c-notext/room.npy", "seg-c-notext/room_classes.png",
                                     "seg-c-notext/room_visual.png"]  # no EXR of class ids
    ids = np.load(out / "seg-c-notext" / "room.npy")
    assert ids.shape == (16, 24) and ids.dtype == np.uint8 and 0 <= ids.min() and ids.max() < 150
    # Exact by construction: the PNG holds the same uint8 ids, and the preview is a palette lookup of them.
    with Image.open(out / "seg-c-notext" / "room_classes.png") as classes:
        assert classes.mode == "L" and np.array_equal(np.asarray(classes), ids)
    with Image.open(out / "seg-c-notext" / "room_visual.png") as visual:
        assert np.array_equal(np.asarray(visual), palette("dmp")[torch.from_numpy(ids).long()].numpy())


def test_commands_come_from_entry_points(monkeypatch):
    calls = []

    def register(subparsers):
        parser = subparsers.add_parser("hello")
        parser.set_defaults(func=lambda args: calls.append(args.command) or 7)

    class EntryPoint:
        name = "hello"

        def load(self):
            return register

    monkeypatch.setattr(cli, "entry_points", lambda group: [EntryPoint()] if group == "dmp.commands" else [])
    assert cli.main(["hello"]) == 7 and calls == ["hello"]


def test_python_dash_m_dmp_model_is_the_dmp_command(monkeypatch, capsys):
    assert (ROOT / "dmp_model" / "__main__.py").is_file()
    monkeypatch.setattr(sys, "argv", ["dmp", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("dmp_model", run_name="__main__")
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: dmp") and "predict" in help_text


@pytest.mark.slow  # 10-20 s: three interpreters importing torch and diffusers
def test_accelerate_launch_shares_the_files_out(tiny_base, adapters, tmp_path):
    """Two CPU processes under `accelerate launch`: each image is predicted by exactly one of them.

    (`accelerate launch --cpu --num_processes 2` starts one process only, without MPI: `--multi_gpu`
    is what runs torchrun, and on a machine without CUDA our CLI puts its processes on the CPU.)
    """
    images = write_images(tmp_path / "images", {f"img{i}.png": (16, 16 + 8 * (i % 2)) for i in range(6)})
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", "-m", "dmp_model",
               *args_for(tiny_base, adapters, [images], out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # two processes on the CPU (gloo), not two on one GPU
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted(tuple(map(int, m)) for m in DONE.findall(result.stderr + result.stdout))
    assert [s[:2] for s in summaries] == [(1, 2), (2, 2)], result.stderr[-3000:]
    assert all(s[2] == 3 and s[3] == 0 and s[4] == 0 for s in summaries)  # 3 + 3 = 6, none twice
    written = snapshot(out)
    assert len(written) == 6 * 5 and not [k for k in written if ".tmp" in k]
    assert all(f"depth-a-notext/img{i}_depth16.png" in written for i in range(6))


def test_a_prompt_without_tokenizer_is_refused_up_front(tiny_base, adapters, tmp_path, caplog):
    from ldm_layout import write_single_file

    model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32")
    model.text._encoder()  # materialise the text encoder to write it into the single file
    single = write_single_file(tmp_path / "tiny.safetensors", model.unet, model.vae, model.text.text_encoder)
    images, out = write_images(tmp_path / "images", {"a.png": (16, 16)}), tmp_path / "out"
    argv = args_for(tiny_base, adapters, [images], out, "--prompt", "a room")
    argv[argv.index("--base") + 1] = str(single)
    config = tmp_path / "config"  # the tiny model's configs, without a tokenizer
    shutil.copytree(tiny_base, config, ignore=shutil.ignore_patterns("tokenizer", "*.safetensors"))
    code, _, text = run(caplog, argv + ["--config", str(config)])
    assert code == 2 and "--prompt needs the CLIP tokenizer" in text and not out.exists()


def test_batch_size_groups_same_size_images_and_a_failed_batch_is_retried_one_by_one(
        tiny_base, adapters, tmp_path, caplog, monkeypatch):
    images = write_images(tmp_path / "images", {"a.png": (16, 16), "b.png": (16, 16), "c.png": (16, 24),
                                                "d.png": (16, 16)})
    batches = []
    original = DMPModel.predict_tasks

    def spy(self, images, *args, **kwargs):
        batches.append(images.shape[0])
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(DMPModel, "predict_tasks", spy)
    code, summaries, _ = run(caplog, args_for(tiny_base, adapters, [images], tmp_path / "batched", "--batch-size", "2"))
    assert code == 0 and summaries == [(1, 1, 4, 0, 0)] and sorted(batches) == [1, 1, 2]
    alone = tmp_path / "alone"
    assert run(caplog, args_for(tiny_base, adapters, [images], alone, "--batch-size", "1"))[0] == 0
    # A batch of 2 against batches of 1: other matrix shapes, so another summation order in the BLAS, and
    # differences of ~1e-5 m (measured) on depths up to 8 m, depending on the machine. 1e-3 m leaves room
    # for that; an image written under another image's name is off by 0.7-1.1 m.
    for name in ("a", "b", "c", "d"):
        np.testing.assert_allclose(np.load(tmp_path / "batched" / "depth-a-notext" / f"{name}.npy"),
                                   np.load(alone / "depth-a-notext" / f"{name}.npy"), atol=1e-3, rtol=0)

    def fail_batches(self, images, *args, **kwargs):  # e.g. out of memory for batches, fine one by one
        if images.shape[0] > 1:
            raise RuntimeError("out of memory")
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(DMPModel, "predict_tasks", fail_batches)
    code, summaries, _ = run(caplog, args_for(tiny_base, adapters, [images], tmp_path / "retried", "--batch-size", "3"))
    assert code == 0 and summaries == [(1, 1, 4, 0, 0)]
