"""Messy image folders through `dmp predict` and the API: every file ends written, skipped or failed with
a one-line reason, never a traceback, never a partial output set; the run always ends with a summary."""

from __future__ import annotations

import json
import logging
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image, ImageOps

from cli_args import predict_argv
from dmp_model import DMPModel
from dmp_model import images as images_module
from dmp_model.cli import batch as batch_module
from dmp_model.cli import main as cli
from dmp_model.images import find_inputs, load_image, pil_to_tensor, to_image_batch
from dmp_model.io import writers
from dmp_model.io.image_files import ImageReadError, read_header, readable_extensions
from factories import write_official_adapter

SUMMARY = re.compile(r"process 1/1: (\d+) written, (\d+) skipped \(already there\), (\d+) failed, (\d+) ignored")
SIZE = (16, 24)  # H, W of the good images


@pytest.fixture(scope="module")
def adapter(tiny_base, tmp_path_factory) -> Path:
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    return write_official_adapter(unet, tmp_path_factory.mktemp("batch-adapter") / "depth-a-notext", seed=7, scale=0.3)


def pixels(seed: int, size=SIZE, channels: int = 3) -> np.ndarray:
    shape = (*size, channels) if channels > 1 else size
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bomb(path: Path, side: int = 100_000) -> Path:
    """A PNG whose header promises side x side RGB pixels (10 gigapixels) in a few dozen bytes."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + png_chunk(b"IEND", b""))
    return path


def write_truncated_png(path: Path) -> Path:
    Image.fromarray(pixels(1)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_unimplemented_dds(path: Path) -> Path:
    """A DDS header with a pixel format (FourCC "XYZW") Pillow does not implement: NotImplementedError."""
    header = bytearray(128)
    header[0:4] = b"DDS "
    struct.pack_into("<III", header, 4, 124, 0x1 | 0x2 | 0x4 | 0x1000, 8)
    struct.pack_into("<I", header, 16, 8)
    struct.pack_into("<II", header, 76, 32, 0x4)
    header[84:88] = b"XYZW"
    path.write_bytes(bytes(header) + b"\0" * 256)
    return path


def write_float_tiff(path: Path, low: float = -200.0, high: float = 800.0) -> np.ndarray:
    values = np.random.default_rng(2).uniform(low, high, SIZE).astype(np.float32)
    Image.fromarray(values).save(path)
    return values


def write_animation(path: Path, count: int = 3) -> list[np.ndarray]:
    frames = [np.full((*SIZE, 3), 40 + 80 * i, np.uint8) for i in range(count)]
    for i, frame in enumerate(frames):
        frame[: 4 + 3 * i, : 5 + 4 * i] = 255  # each frame its own picture
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100)
    return frames


def messy_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    Image.fromarray(pixels(0)).save(folder / "good.png")
    write_bomb(folder / "bomb.png")
    write_truncated_png(folder / "truncated.png")
    write_unimplemented_dds(folder / "odd.dds")
    write_float_tiff(folder / "float.tif")
    write_animation(folder / "anim.gif")
    Image.fromarray(pixels(3)).save(folder / "photo.jpg")
    Image.fromarray(pixels(4)).save(folder / "photo.png")
    (folder / "fake.jpg").mkdir()  # a folder named like an image: searched, not an image
    Image.fromarray(pixels(5)).save(folder / "fake.jpg" / "inner.bmp")
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(pixels(6)).save(folder / ".hidden.png")
    return folder


def run(caplog, argv) -> tuple[int, tuple[int, ...] | None, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = cli.main(argv)
    text = "\n".join(r.getMessage() for r in caplog.records)
    found = SUMMARY.findall(text)
    return code, tuple(map(int, found[-1])) if found else None, text


def argv_for(tiny_base, adapter, inputs, out, *extra) -> list[str]:
    return predict_argv(tiny_base, inputs, out, [adapter], "--processing-resolution", "0", "--steps", "1", *extra)


def read_report(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    report = {Path(line["file"]).name: line for line in lines}
    assert len(report) == len(lines)  # one line per file
    return report


def outputs_of(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}


def test_a_messy_folder_finishes_with_one_outcome_per_file_and_a_summary(tiny_base, adapter, tmp_path, caplog):
    folder, out, report_file = messy_folder(tmp_path / "library"), tmp_path / "out", tmp_path / "run.jsonl"
    code, summary, text = run(caplog, argv_for(tiny_base, adapter, [folder], out, "--report", str(report_file)))
    assert code == 1  # some failed
    assert summary == (6, 0, 3, 2)
    report = read_report(report_file)
    statuses = {name: line["status"] for name, line in report.items()}
    assert statuses == {"good.png": "written", "float.tif": "written", "anim.gif": "written",
                        "photo.jpg": "written", "photo.png": "written", "inner.bmp": "written",
                        "bomb.png": "failed", "truncated.png": "failed", "odd.dds": "failed",
                        "notes.txt": "ignored", ".hidden.png": "ignored"}
    reasons = {name: line["reason"] for name, line in report.items()}
    assert "decompression bombs" in reasons["bomb.png"] and "--max-pixels" in reasons["bomb.png"]
    assert "truncated" in reasons["truncated.png"]
    assert "not implemented by Pillow" in reasons["odd.dds"]
    assert all("\n" not in (reason or "") for reason in reasons.values())
    # Same stems keep their extension; everything written is listed in the report, and nothing else exists.
    depth = "depth-a-notext"
    assert report["photo.jpg"]["outputs"][-1] == str(out / depth / "photo.jpg_visual.png")
    listed = {Path(p).relative_to(out).as_posix() for line in report.values() for p in line["outputs"]}
    assert outputs_of(out) == listed
    assert {f"{depth}/{stem}.npy" for stem in ("good", "float", "anim", "photo.jpg", "photo.png", "fake.jpg/inner")} \
        <= listed
    assert not any(name.startswith(("bomb", "truncated", "odd")) for name in listed)
    # The log: a line per failed file naming it, the frames rule, the float rule, the failed files at the end.
    assert re.search(r"bomb\.png: cannot read image: 100000x100000 pixels", text)
    assert "anim.gif: 3 frames (GIF); predicting the first (--frames all predicts each)" in text
    assert re.search(r"float\.tif: float values span -1\d\d\.\d+\.\.7\d\d\.\d+; normalised", text)
    assert re.search(r"failed: .*bomb\.png, .*odd\.dds, .*truncated\.png$", text, re.M)
    # A second run skips what is there and fails the same files again.
    code, summary, _ = run(caplog, argv_for(tiny_base, adapter, [folder], out, "--report", str(report_file)))
    assert code == 1 and summary == (0, 6, 3, 2)
    assert {line["status"] for line in read_report(report_file).values()} == {"skipped", "failed", "ignored"}


def test_every_frame_with_frames_all(tiny_base, adapter, tmp_path, caplog):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    write_animation(folder / "anim.gif")
    code, summary, _ = run(caplog, argv_for(tiny_base, adapter, [folder], out, "--frames", "all", "--batch-size", "1"))
    assert code == 0 and summary == (1, 0, 0, 0)  # one file, written: its three frames
    frames = [np.load(out / "depth-a-notext" / "anim" / f"frame_00000{i}.npy") for i in (1, 2, 3)]
    assert all(f.shape == SIZE for f in frames)
    model = DMPModel.from_pretrained(tiny_base, device="cpu", precision="fp32", adapters=[adapter])
    second = model.predict(load_image(folder / "anim.gif", frame=1), steps=1, processing_resolution=0).raw[0]
    # The same picture, batch shape, weights and float ops as the CLI's: equal (the tolerance is slack); the
    # frames differ in content, so a frame written under another's name is off by far more.
    np.testing.assert_allclose(frames[1], second.numpy(), atol=1e-6)
    assert np.abs(frames[0] - frames[1]).max() > 1e-3


def test_the_pixel_limit_is_an_option(tiny_base, adapter, tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(pixels(0)).save(folder / "a.png")  # 384 pixels
    code, summary, text = run(caplog, argv_for(tiny_base, adapter, [folder], tmp_path / "o1", "--max-pixels", "300"))
    assert code == 1 and summary == (0, 0, 1, 0)
    assert "24x16 pixels (0.0 megapixels) is above the limit of 0.0 megapixels" in text
    assert "--max-pixels 384" in text
    code, summary, _ = run(caplog, argv_for(tiny_base, adapter, [folder], tmp_path / "o2", "--max-pixels", "384"))
    assert code == 0 and summary == (1, 0, 0, 0)
    # 0 lifts the limit: the 10-gigapixel header then fails only when Pillow decodes its few bytes.
    write_bomb(folder / "bomb.png")
    code, summary, text = run(caplog, argv_for(tiny_base, adapter, [folder], tmp_path / "o3", "--max-pixels", "0"))
    assert code == 1 and summary == (1, 0, 1, 0) and "decompression bombs" not in text
    with pytest.raises(ImageReadError, match="above the limit"):
        load_image(folder / "a.png", max_pixels=383)


def test_out_of_memory_fails_that_file_and_the_run_goes_on(tiny_base, adapter, tmp_path, caplog, monkeypatch):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(pixels(i)).save(folder / f"same{i}.png")
    Image.fromarray(pixels(9, size=(24, 32))).save(folder / "large.png")
    Image.fromarray(pixels(10)).save(folder / "unreadable.png")
    original = DMPModel.predict_tasks
    batches = []

    def predict(self, images, *args, **kwargs):
        batches.append(images.shape[0])
        if images.shape[-1] == 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if images.shape[0] > 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB")
        return original(self, images, *args, **kwargs)

    real_pixels = images_module._pil_pixels

    def convert(image, *args, **kwargs):
        if Path(str(args[-1])).name == "unreadable.png":
            raise MemoryError()
        return real_pixels(image, *args, **kwargs)

    monkeypatch.setattr(DMPModel, "predict_tasks", predict)
    monkeypatch.setattr(images_module, "_pil_pixels", convert)
    argv = argv_for(tiny_base, adapter, [folder], out, "--report", str(tmp_path / "r.jsonl"))
    code, summary, text = run(caplog, argv)
    assert code == 1 and summary == (3, 0, 2, 0)
    assert sorted(batches) == [1, 1, 1, 1, 3]  # the batch of three failed, then one by one
    report = read_report(tmp_path / "r.jsonl")
    assert report["large.png"]["reason"].startswith("out of memory predicting its 32x24 pixels; try --batch-size 1")
    assert "out of memory" in report["unreadable.png"]["reason"]
    assert not [p for p in outputs_of(out) if p.startswith(("depth-a-notext/large", "depth-a-notext/unreadable"))]


def test_a_failure_while_writing_leaves_no_output_of_that_image(tiny_base, adapter, tmp_path, caplog, monkeypatch):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(pixels(ord(name))).save(folder / f"{name}.png")
    real = writers.write_png8

    def write_png8(path, image):  # the visual, written after the raw files: out of memory for b
        if Path(path).name.startswith(".b_visual.png"):
            raise MemoryError()
        return real(path, image)

    monkeypatch.setattr(writers, "write_png8", write_png8)
    code, summary, text = run(caplog, argv_for(tiny_base, adapter, [folder], out))
    assert code == 1 and summary == (2, 0, 1, 0)
    assert re.search(r"b\.png: writing its outputs failed, none were written \(MemoryError", text)
    assert outputs_of(out) == {f"depth-a-notext/{n}{s}" for n in "ac" for s in (".npy", "_depth16.png", "_visual.png")}
    monkeypatch.setattr(writers, "write_png8", real)  # a rerun completes b, and only b
    assert run(caplog, argv_for(tiny_base, adapter, [folder], out))[1] == (1, 2, 0, 0)


def test_same_stems_keep_their_extension_and_real_conflicts_name_the_files(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    names = ["photo.jpg", "photo.png", "Photo.PNG", "photo.jpg.png", "solo.png", "sub/photo.jpg"]
    files = [folder / name for name in names]
    stems = {f.relative_to(folder).as_posix(): s.as_posix() for f, s in
             batch_module.output_stems(files, [str(folder)]).items()}
    assert stems == {"photo.jpg": "photo.jpg", "photo.png": "photo.png", "Photo.PNG": "Photo.PNG",
                     "photo.jpg.png": "photo.jpg.png", "solo.png": "solo", "sub/photo.jpg": "sub/photo"}
    one, two = tmp_path / "one" / "photo.png", tmp_path / "two" / "photo.png"
    with pytest.raises(ValueError, match=f"{re.escape(str(one))} and {re.escape(str(two))}.*pass the folder"):
        batch_module.output_stems([one, two], [str(one), str(two)])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_paths_and_pil_images_are_turned_upright_alike(tmp_path, monkeypatch, orientation):
    monkeypatch.setattr(images_module, "_BAND_PIXELS", 9)  # bands of one row: each lands by the orientation
    image = Image.fromarray(pixels(orientation, size=(5, 7)))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "o.png", exif=exif.tobytes())
    with Image.open(tmp_path / "o.png") as opened:
        expected = torch.from_numpy(np.array(ImageOps.exif_transpose(opened))).permute(2, 0, 1).float() / 255
        from_pil = to_image_batch(opened)[0]
    assert expected.shape[1:] == ((7, 5) if orientation >= 5 else (5, 7))
    torch.testing.assert_close(load_image(tmp_path / "o.png"), expected, atol=0, rtol=0)  # copies and k / 255
    torch.testing.assert_close(from_pil, expected, atol=0, rtol=0)
    assert read_header(tmp_path / "o.png").size == tuple(expected.shape[1:])


def test_float_and_32_bit_images_follow_one_rule():
    inside = np.array([[0.0, 0.25, 1.0]], np.float32)
    torch.testing.assert_close(pil_to_tensor(Image.fromarray(inside))[:, 0], torch.from_numpy(inside[0]).expand(3, -1))
    wide = np.array([[-2.0, 0.0, 6.0, np.nan, np.inf]], np.float32)
    # (v - min) / (max - min) over the finite values: exact for these; NaN -> 0, +inf -> 1
    torch.testing.assert_close(pil_to_tensor(Image.fromarray(wide))[0, 0], torch.tensor([0.0, 0.25, 1.0, 0.0, 1.0]))
    holes = np.array([[0.2, 0.6, np.nan]], np.float32)  # in range: kept as they are, the hole set to 0
    torch.testing.assert_close(pil_to_tensor(Image.fromarray(holes))[0, 0], torch.tensor([0.2, 0.6, 0.0]))
    sixteen = np.array([[0, 65535]], np.int32)
    torch.testing.assert_close(pil_to_tensor(Image.fromarray(sixteen, "I"))[0, 0], torch.tensor([0.0, 1.0]))
    big = np.array([[-10, 90, 190]], np.int32)
    torch.testing.assert_close(pil_to_tensor(Image.fromarray(big, "I"))[0, 0], torch.tensor([0.0, 0.5, 1.0]))


def test_float_files_are_normalised_not_refused(tmp_path, caplog):
    values = write_float_tiff(tmp_path / "f.tif")
    with caplog.at_level(logging.INFO):
        tensor = load_image(tmp_path / "f.tif")
    expected = (values - values.min()) / (values.max() - values.min())
    # float32 subtraction and division of these values: a few float32 steps of [0, 1] at most
    torch.testing.assert_close(tensor[0], torch.from_numpy(expected), atol=4e-7, rtol=0)
    assert "normalised by their own range" in caplog.text
    assert to_image_batch(tmp_path / "f.tif").max() == 1.0


@pytest.mark.parametrize("make, reason", [
    (lambda p: write_bomb(p / "bomb.png"), "decompression bombs"),
    (lambda p: write_truncated_png(p / "t.png"), "truncated"),
    (lambda p: write_unimplemented_dds(p / "x.dds"), "not implemented by Pillow"),
    (lambda p: (p / "fake.png").write_bytes(b"GIF89a and then nothing") and p / "fake.png", "damaged|identify"),
    (lambda p: (p / "dir.jpg").mkdir() or p / "dir.jpg", "is a folder"),
])
def test_the_api_raises_value_errors_naming_the_file(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ValueError, match=f"cannot read image {re.escape(str(path))}: .*({reason})"):
        to_image_batch(path)


def test_a_lazily_decoded_pil_image_that_fails_is_a_value_error(tmp_path):
    path = write_truncated_png(tmp_path / "t.png")
    with Image.open(path) as image, pytest.raises(ValueError, match="cannot read image .*t.png: the file is truncated"):
        to_image_batch(image)


def test_pillow_warnings_become_log_lines_naming_the_file(tmp_path, caplog, recwarn):
    # EXIF whose description tag points past the end of its block: Pillow warns while reading the orientation.
    tiff = (b"II*\x00" + struct.pack("<IH", 8, 2) + struct.pack("<HHII", 0x0112, 3, 1, 6)
            + struct.pack("<HHII", 0x010E, 2, 100, 1000) + struct.pack("<I", 0))
    Image.fromarray(pixels(0)).save(tmp_path / "w.jpg", exif=b"Exif\x00\x00" + tiff)
    with caplog.at_level(logging.WARNING):
        tensor = load_image(tmp_path / "w.jpg")
    assert tensor.shape == (3, SIZE[1], SIZE[0])  # orientation 6 still applied
    assert re.search(r"w\.jpg: Tag data larger than file", caplog.text)
    assert not [w for w in recwarn if "Tag data" in str(w.message)]


def test_folders_take_every_format_pillow_decodes_and_list_what_they_pass_over(tmp_path):
    assert {".gif", ".tga", ".psd", ".jp2", ".ppm", ".pfm", ".mpo", ".webp", ".tif"} <= set(readable_extensions())
    assert not {".pdf", ".mpg", ".h5"} & set(readable_extensions())  # save-only, header-only, stub
    for name in ("a.gif", "b.tga", "c.PSD", "fake.jpg/d.png", "out/e.png", ".git/f.png", "g.xmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    found = find_inputs([tmp_path], exclude=[tmp_path / "out"])
    assert [p.relative_to(tmp_path).as_posix() for p in found.files] == ["a.gif", "b.tga", "c.PSD", "fake.jpg/d.png"]
    assert {p.relative_to(tmp_path).as_posix(): r.split(" (")[0] for p, r in found.ignored} == {
        ".git": "a hidden folder, not searched", "g.xmp": "not an image or video format this installation reads"}


def test_usage_errors_list_what_was_passed_over_and_exit_2(tiny_base, adapter, tmp_path, caplog):
    folder = tmp_path / "in"
    (folder / "fake.jpg").mkdir(parents=True)  # a folder named like an image, empty: no image at all
    (folder / "notes.txt").write_text("not an image")
    code, _, text = run(caplog, argv_for(tiny_base, adapter, [folder], tmp_path / "out"))
    assert code == 2 and "1 files passed over, listed above" in text
    assert re.search(r"notes\.txt: ignored: not an image or video format", text)
    Image.fromarray(pixels(0)).save(folder / "a.png")
    (tmp_path / "file").write_text("")  # a report inside a file cannot be written: before the model loads
    code, _, text = run(caplog, argv_for(tiny_base, adapter, [folder], tmp_path / "out",
                                         "--report", str(tmp_path / "file" / "r.jsonl")))
    assert code == 2 and "--report" in text and "cannot be written" in text and not (tmp_path / "out").exists()
