"""Video files: PyAV I/O (dmp_model.io.video) and `dmp predict` on clips (dmp_model.cli.clips)."""

from __future__ import annotations

import logging
import re
import sys

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from cli_args import predict_argv
from dmp_model.cli import main as cli
from dmp_model.io.video import VIDEO_EXTENSIONS, probe_video, read_frames, require_av, write_video
from factories import write_official_adapter

pytest.importorskip("av")

DONE = re.compile(r"process (\d+)/(\d+): (\d+) written, (\d+) skipped \(already there\), (\d+) failed")
DEPTH, NORMAL = "depth-v-notext", "normal-v-notext"


def ramp_frames(count: int, height: int = 32, width: int = 48) -> torch.Tensor:
    """Frames [count, H, W, 3] in [0, 1]: a smooth pattern panning a pixel per frame, each brighter."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width + count), indexing="ij")
    pattern = 0.25 + 0.2 * torch.sin(x / 5.0) * torch.cos(y / 7.0)
    frames = [pattern[:, t:t + width] + 0.03 * t for t in range(count)]
    return torch.stack(frames).unsqueeze(-1).expand(-1, -1, -1, 3).clamp(0, 1)


def write_clip(path, count: int = 7, height: int = 32, width: int = 48, fps: float = 12):
    with write_video(path, fps) as write:
        frames = ramp_frames(count, height, width)
        write(frames[:3])
        write(frames[3:])
    return path


@pytest.mark.parametrize("suffix", VIDEO_EXTENSIONS)
def test_video_round_trips_frame_count_size_and_rate(tmp_path, suffix):
    path = write_clip(tmp_path / f"clip{suffix}")
    info = probe_video(path)
    assert (info.frames, info.height, info.width, float(info.fps)) == (7, 32, 48, 12.0)
    chunks = list(read_frames(info, start=0, chunk=3))
    assert [c.shape[0] for c in chunks] == [3, 3, 1] and chunks[0].shape[1:] == (3, 32, 48)
    decoded = torch.cat(chunks).permute(0, 2, 3, 1)
    assert float((decoded - ramp_frames(7)).abs().mean()) < 0.03  # lossy, but the same pictures
    later = torch.cat(list(read_frames(info, start=4, chunk=2)))
    # Exact: video decoding is integer arithmetic specified bit for bit, and the same pixels convert alike.
    torch.testing.assert_close(later, torch.cat(chunks)[4:], rtol=0, atol=0)


def test_odd_sizes_are_padded_to_even_for_the_encoder(tmp_path):
    info = probe_video(write_clip(tmp_path / "odd.mp4", count=2, height=17, width=23))
    assert (info.height, info.width) == (18, 24)


def test_nothing_is_left_when_encoding_fails(tmp_path):
    with pytest.raises(ValueError, match="one size"), write_video(tmp_path / "bad.mp4") as write:
        write(torch.zeros(1, 16, 16, 3))
        write(torch.zeros(1, 8, 8, 3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("suffix", "keep"), [(".mp4", 0.5), (".mkv", 0.8), (".webm", 0.8)])
def test_truncated_video_gives_a_clear_error_naming_it(tmp_path, suffix, keep):
    whole = write_clip(tmp_path / f"whole{suffix}", count=12).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole[:int(len(whole) * keep)])
    with pytest.raises(ValueError, match=rf"video {re.escape(str(cut))}.*(truncated|damaged)"):
        probe_video(cut)


def test_missing_pyav_says_how_to_install_it(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    with pytest.raises(ImportError, match=re.escape("pip install 'dmp-dense-prediction[video]'")):
        require_av()
    (tmp_path / "clip.mp4").write_bytes(b"not read")
    with caplog.at_level(logging.ERROR, logger="dmp"):
        code = cli.main(["predict", str(tmp_path / "clip.mp4"), "--base", "unused", "--adapter", "unused"])
    assert code == 2 and "dmp-dense-prediction[video]" in caplog.text


# `dmp predict` on a clip, with the tiny base --------------------------------------------------------


@pytest.fixture(scope="module")
def clip_adapters(tiny_base, tmp_path_factory):
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    folder = tmp_path_factory.mktemp("video-adapters")
    return [write_official_adapter(unet, folder / name, seed=seed, scale=0.3)
            for seed, name in ((70, DEPTH), (71, NORMAL))]


def predict(caplog, tiny_base, clip_adapters, inputs, out, *extra):
    argv = predict_argv(tiny_base, inputs, out, clip_adapters, "--processing-resolution", "0", "--steps", "2",
                        "--batch-size", "3", *extra)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dmp"):
        code = cli.main(argv)
    return code, [tuple(map(int, m)) for m in DONE.findall(caplog.text)], caplog.text


def test_predict_a_video_writes_frames_and_a_preview_and_resumes(tiny_base, clip_adapters, tmp_path, caplog):
    clip, out = write_clip(tmp_path / "walk.mp4"), tmp_path / "out"
    code, summaries, _ = predict(caplog, tiny_base, clip_adapters, [clip], out)
    assert code == 0 and summaries == [(1, 1, 1, 0, 0)]
    frames = [f"frame_{i:06d}" for i in range(1, 8)]
    expected = {f"{DEPTH}/walk/{f}{s}" for f in frames for s in (".npy", "_depth16.png")}
    expected |= {f"{NORMAL}/walk/{f}.npy" for f in frames} | {f"{DEPTH}/walk_visual.mp4", f"{NORMAL}/walk_visual.mp4"}
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == expected
    depth = np.stack([np.load(out / DEPTH / "walk" / f"{f}.npy") for f in frames])
    assert depth.shape == (7, 32, 48) and depth.dtype == np.float32
    preview = probe_video(out / DEPTH / "walk_visual.mp4")
    assert (preview.frames, preview.height, preview.width, float(preview.fps)) == (7, 32, 48, 12.0)

    # Interrupted: the last frames of one adapter and a preview are missing. The rerun starts at the first
    # missing frame, leaves earlier frames alone, and continues the alignment as if never stopped.
    for f in frames[4:]:
        (out / DEPTH / "walk" / f"{f}.npy").unlink()
        (out / DEPTH / "walk" / f"{f}_depth16.png").unlink()
    (out / NORMAL / "walk_visual.mp4").unlink()
    kept = (out / DEPTH / "walk" / f"{frames[3]}.npy").stat().st_mtime_ns
    code, summaries, _ = predict(caplog, tiny_base, clip_adapters, [clip], out)
    assert code == 0 and summaries == [(1, 1, 1, 0, 0)]
    assert (out / DEPTH / "walk" / f"{frames[3]}.npy").stat().st_mtime_ns == kept
    resumed = np.stack([np.load(out / DEPTH / "walk" / f"{f}.npy") for f in frames])
    # Only batch composition differs (frames 4-6 now run as one batch, not in [3, 4, 5] and [6]): fp32 rounding,
    # which depends on the batch and the thread count (~3e-5 m measured, 2 threads), so 1e-4 of the depth scale.
    np.testing.assert_allclose(resumed, depth, rtol=0, atol=1e-4 * float(np.abs(depth).max()))
    assert probe_video(out / NORMAL / "walk_visual.mp4").frames == 7
    assert predict(caplog, tiny_base, clip_adapters, [clip], out)[1] == [(1, 1, 0, 1, 0)]  # complete: skipped
    (out / DEPTH / "walk_visual.mp4").unlink()  # only a preview missing: made again, no frame recomputed
    before = {p: p.stat().st_mtime_ns for p in (out / DEPTH / "walk").iterdir()}
    assert predict(caplog, tiny_base, clip_adapters, [clip], out)[1] == [(1, 1, 1, 0, 0)]
    assert {p: p.stat().st_mtime_ns for p in (out / DEPTH / "walk").iterdir()} == before
    assert probe_video(out / DEPTH / "walk_visual.mp4").frames == 7

    # Without alignment the first frame is the same and the later depth frames are not.
    code, _, _ = predict(caplog, tiny_base, clip_adapters, [clip], tmp_path / "plain", "--temporal-alignment", "0")
    plain = np.stack([np.load(tmp_path / "plain" / DEPTH / "walk" / f"{f}.npy") for f in frames])
    # Frame 0 ran in the same batch [0, 1, 2] both times and the first frame is never rescaled: exact.
    np.testing.assert_array_equal(plain[0], depth[0])
    # Alignment moves later frames by millimetres to centimetres; rounding alone stays near 1e-4.
    assert np.abs(plain[1:] - depth[1:]).max() > 1e-3
    # Normals are never aligned. Frames 0-3 ran in the same batches at the same places both times: the same
    # operations, exact. The resume recomputed frames 4-6 as one batch: fp32 rounding of another batch shape
    # (~1e-4 measured; renormalising unit vectors can amplify it), so a tolerance there.
    for index, frame in enumerate(frames):
        plain_normal = np.load(tmp_path / "plain" / NORMAL / "walk" / f"{frame}.npy")
        normal = np.load(out / NORMAL / "walk" / f"{frame}.npy")
        if index < 4:
            np.testing.assert_array_equal(plain_normal, normal)
        else:
            np.testing.assert_allclose(plain_normal, normal, rtol=0, atol=1e-3)


def test_a_truncated_video_fails_by_name_and_the_rest_is_written(tiny_base, clip_adapters, tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    whole = write_clip(folder / "good.mkv", count=4).read_bytes()
    (folder / "cut.mkv").write_bytes(whole[:int(len(whole) * 0.7)])
    code, summaries, text = predict(caplog, tiny_base, clip_adapters, [folder], tmp_path / "out")
    assert code == 1 and summaries == [(1, 1, 1, 0, 1)]
    assert re.search(rf"{re.escape(str(folder / 'cut.mkv'))}: video .* truncated", text)
    assert (tmp_path / "out" / DEPTH / "good" / "frame_000004.npy").exists()
    assert not (tmp_path / "out" / DEPTH / "cut").exists()


def test_video_inputs_need_npy_among_the_formats(tiny_base, clip_adapters, tmp_path, caplog):
    clip = write_clip(tmp_path / "clip.webm", count=2)
    code, _, text = predict(caplog, tiny_base, clip_adapters, [clip], tmp_path / "out", "--formats", "png,visual")
    assert code == 2 and "video inputs need npy among --formats (got png,visual)" in text
    assert not (tmp_path / "out").exists()
