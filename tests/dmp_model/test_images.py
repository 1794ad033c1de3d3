"""Images in and out: processing size (torchvision's rule), padding to multiples of 8, conversions, file lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dmp_model.images import (
    array_to_tensor,
    frame_batch,
    list_images,
    load_image,
    pil_to_tensor,
    processing_size,
    resize,
    to_image_batch,
    unframe,
)


# Expected values written out from torchvision's rule (`_compute_resized_output_size` with size=[r]):
# the shorter side becomes r, the longer int(r * long / short) (truncated); 0 keeps the native size.
@pytest.mark.parametrize("height, width, resolution, expected", [
    (480, 640, 512, (512, 682)),     # landscape: 682.67 truncated
    (640, 480, 512, (682, 512)),     # portrait
    (512, 512, 512, (512, 512)),     # square
    (300, 300, 64, (64, 64)),        # square, downscale
    (1080, 1920, 512, (512, 910)),   # 910.22
    (1920, 1080, 512, (910, 512)),
    (100, 333, 64, (64, 213)),       # 213.12
    (333, 100, 64, (213, 64)),
    (300, 900, 100, (100, 300)),     # exact ratio
    (16, 24, 512, (512, 768)),       # upscaling follows the same rule
    (7, 1000, 8, (8, 1142)),         # 1142.86
    (1, 3, 8, (8, 24)),
    (37, 53, 0, (37, 53)),           # 0 = native
    (1, 1, 0, (1, 1)),
])
def test_processing_size_follows_torchvision(height, width, resolution, expected):
    assert processing_size(height, width, resolution) == expected


@pytest.mark.parametrize("resolution, error, message", [
    (-1, ValueError, "must be 0 .native. or at least 8"), (7, ValueError, "at least 8"),
    (512.0, TypeError, "must be an integer"), ("512", TypeError, "must be an integer"),
    (True, TypeError, "must be an integer")])
def test_processing_size_rejects_bad_resolutions(resolution, error, message):
    with pytest.raises(error, match=message):
        processing_size(10, 10, resolution)


def test_processing_size_accepts_numpy_integers():
    assert processing_size(480, 640, np.int64(512)) == (512, 682)


def test_frame_batch_pads_by_edge_replication_and_unframe_crops_back():
    images = torch.rand(2, 3, 20, 13, generator=torch.Generator().manual_seed(0))
    pixels, framing = frame_batch(images, 0)
    assert framing.input_size == (20, 13) and framing.processing_size == (20, 13) and framing.padded_size == (24, 16)
    assert pixels.shape == (2, 3, 24, 16)
    # Exact by construction: the padding copies pixels; the range stays [0, 1] (the backend scales for its VAE).
    scaled = images
    torch.testing.assert_close(pixels[..., :20, :13], scaled, atol=0, rtol=0)
    # Right columns repeat the last column, bottom rows the last row (and the corner the last pixel).
    torch.testing.assert_close(pixels[..., :20, 13:], scaled[..., :, 12:13].expand(-1, -1, -1, 3), atol=0, rtol=0)
    torch.testing.assert_close(pixels[..., 20:, :13], scaled[..., 19:20, :].expand(-1, -1, 4, -1), atol=0, rtol=0)
    torch.testing.assert_close(pixels[..., 20:, 13:], scaled[..., 19:20, 12:13].expand(-1, -1, 4, 3), atol=0, rtol=0)
    torch.testing.assert_close(unframe(pixels, framing), scaled, atol=0, rtol=0)


def test_frame_batch_resizes_then_pads():
    images = torch.rand(1, 3, 30, 44, generator=torch.Generator().manual_seed(1))
    pixels, framing = frame_batch(images, 16)
    assert framing.processing_size == (16, 23) and framing.padded_size == (16, 24) and pixels.shape == (1, 3, 16, 24)
    torch.testing.assert_close(pixels[..., :, 23], pixels[..., :, 22], atol=0, rtol=0)  # a copy
    assert unframe(pixels, framing).shape == (1, 3, 16, 23)
    # Bicubic can overshoot, but shrinking noise by ~2x averages it: these pixels span 0.10..0.89.
    assert 0 <= pixels.min() and pixels.max() <= 1 + 1e-6


def test_multiples_of_8_are_not_padded():
    images = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    pixels, framing = frame_batch(images, 0)
    assert framing.padded_size == (16, 24)
    torch.testing.assert_close(pixels, images, atol=0, rtol=0)


def test_resize_is_identity_at_the_same_size_and_nearest_keeps_values():
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 9, 7, generator=generator)
    assert resize(images, (9, 7)) is images
    ids = torch.randint(0, 150, (1, 1, 9, 7), generator=generator).float()
    for size in ((4, 3), (20, 15)):
        resized = resize(ids, size, mode="nearest")
        assert resized.shape == (1, 1, *size) and set(resized.unique().tolist()) <= set(ids.unique().tolist())
    half = resize(torch.rand(1, 3, 10, 10, dtype=torch.float64, generator=generator), (5, 5))
    assert half.dtype == torch.float64


def rgb_image() -> np.ndarray:
    return (np.random.default_rng(0).random((5, 6, 3)) * 255).astype(np.uint8)


def test_pil_rgb_and_grey():
    rgb = rgb_image()
    tensor = pil_to_tensor(Image.fromarray(rgb))
    assert tensor.shape == (3, 5, 6) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    grey = pil_to_tensor(Image.fromarray(rgb[:, :, 0], "L"))
    torch.testing.assert_close(grey, torch.from_numpy(rgb[:, :, 0]).float().div(255).expand(3, -1, -1))


def test_pil_rgba_composites_onto_white():
    pixels = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    tensor = pil_to_tensor(Image.fromarray(pixels, "RGBA"))
    torch.testing.assert_close(tensor[:, 0, 0], torch.ones(3))                  # transparent red -> white
    torch.testing.assert_close(tensor[:, 0, 1], torch.tensor([1.0, 0.0, 0.0]))  # opaque red stays red
    assert torch.allclose(tensor[:, 0, 2], torch.full((3,), 127 / 255), atol=1 / 255)  # half black on white


def test_pil_la_and_palette_with_transparency():
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [200, 255]]], dtype=np.uint8), "LA")
    torch.testing.assert_close(pil_to_tensor(la)[0, 0], torch.tensor([1.0, 0.0, 200 / 255]))
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    for x in range(3):
        palette.putpixel((x, 0), x)
    palette.info["transparency"] = 1  # the green entry is transparent
    tensor = pil_to_tensor(palette)
    torch.testing.assert_close(tensor[:, 0, :], torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
    del palette.info["transparency"]
    torch.testing.assert_close(pil_to_tensor(palette)[:, 0, 1], torch.tensor([0.0, 1.0, 0.0]))


def test_pil_16_bit_and_float():
    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    torch.testing.assert_close(pil_to_tensor(sixteen)[:, 0], torch.tensor([0.0, 32768 / 65535, 1.0]).expand(3, -1))
    floats = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    torch.testing.assert_close(pil_to_tensor(floats)[:, 0], torch.tensor([0.0, 0.25, 1.0]).expand(3, -1))


def test_16_bit_png_file_reads_at_full_precision(tmp_path):
    Image.fromarray(np.array([[0, 1, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    torch.testing.assert_close(load_image(tmp_path / "deep.png")[0, 0], torch.tensor([0.0, 1 / 65535, 1.0]))


@pytest.mark.parametrize("array, expected", [
    (np.array([[0, 255]], dtype=np.uint8), [0.0, 1.0]),
    (np.array([[0, 65535]], dtype=np.uint16), [0.0, 1.0]),
    (np.array([[0.0, 0.5]], dtype=np.float32), [0.0, 0.5]),
    (np.array([[0.0, 0.5]], dtype=np.float64), [0.0, 0.5]),
    (np.array([[[0], [255]]], dtype=np.uint8), [0.0, 1.0]),
])
def test_array_grey_layouts(array, expected):
    tensor = array_to_tensor(array)
    assert tensor.shape == (3, 1, 2) and tensor.dtype == torch.float32
    torch.testing.assert_close(tensor[:, 0], torch.tensor(expected).expand(3, -1))


def test_array_rgb_rgba_and_grey_alpha():
    rgb = rgb_image()
    torch.testing.assert_close(array_to_tensor(rgb), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255]]], dtype=np.uint8)
    torch.testing.assert_close(array_to_tensor(rgba)[:, 0].T, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0]]))
    grey_alpha = np.array([[[0.2, 0.0], [0.2, 1.0]]], dtype=np.float32)
    torch.testing.assert_close(array_to_tensor(grey_alpha)[0, 0], torch.tensor([1.0, 0.2]))


@pytest.mark.parametrize("array, error, message", [
    (np.zeros((4, 4), dtype=bool), TypeError, "must be uint8, uint16 or float, got bool"),
    (np.zeros((4, 4), dtype=np.int32), TypeError, "got int32"),
    (np.zeros((4, 4, 5), dtype=np.uint8), ValueError, r"C in 1..4, got shape \(4, 4, 5\)"),
    (np.zeros((2, 4, 4, 3), dtype=np.uint8), ValueError, "must be \\[H, W\\] or \\[H, W, C\\]"),
])
def test_array_rejections(array, error, message):
    with pytest.raises(error, match=message):
        array_to_tensor(array)


def write_png(path, seed, size=(8, 12)):
    array = (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def test_to_image_batch_from_paths_and_mixed_types(tmp_path):
    arrays = [write_png(tmp_path / f"{i}.png", i) for i in range(3)]
    # Exact by construction: k / 255 rounded to float32 is the same whether divided in float32 (here) or in
    # float64 and then rounded (the loader), for every k in 0..255 (checked exhaustively); the rest is copies.
    expected = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])
    from_paths = to_image_batch([tmp_path / "0.png", str(tmp_path / "1.png"), tmp_path / "2.png"])
    torch.testing.assert_close(from_paths, expected, atol=0, rtol=0)
    mixed = to_image_batch([tmp_path / "0.png", Image.fromarray(arrays[1]), expected[2]])
    torch.testing.assert_close(mixed, expected, atol=0, rtol=0)
    torch.testing.assert_close(to_image_batch(arrays[0]), expected[:1], atol=0, rtol=0)
    torch.testing.assert_close(to_image_batch(tmp_path / "2.png"), expected[2:], atol=0, rtol=0)


def test_a_batch_tensor_inside_a_list_keeps_all_its_images():
    generator = torch.Generator().manual_seed(4)
    batch = torch.rand(2, 3, 8, 8, generator=generator)
    single = torch.rand(3, 8, 8, generator=generator)
    result = to_image_batch([batch, single])
    assert result.shape == (3, 3, 8, 8)
    torch.testing.assert_close(result, torch.cat([batch, single[None]]), atol=0, rtol=0)  # copies


def test_tensor_layouts_and_dtypes():
    uint8 = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    torch.testing.assert_close(to_image_batch(uint8)[0, :, 0], torch.tensor([0, 128 / 255, 1.0]).expand(3, -1))
    grey = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(to_image_batch(grey), grey.expand(-1, 3, -1, -1))
    rgba = torch.zeros(1, 4, 2, 2)  # black, fully transparent -> white
    torch.testing.assert_close(to_image_batch(rgba), torch.ones(1, 3, 2, 2))
    with pytest.raises(TypeError, match="float in \\[0, 1\\] or uint8, got dtype torch.int64"):
        to_image_batch(torch.zeros(1, 3, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="got shape \\(1, 8, 8, 3\\)"):
        to_image_batch(torch.zeros(1, 8, 8, 3))  # ComfyUI's channels-last layout must be converted first


def test_mixed_sizes_and_bad_items_are_refused(tmp_path):
    write_png(tmp_path / "a.png", 0, size=(8, 12))
    write_png(tmp_path / "b.png", 1, size=(12, 8))
    with pytest.raises(ValueError, match=r"images of different sizes \[\(8, 12\), \(12, 8\)\] cannot share a batch"):
        to_image_batch([tmp_path / "a.png", tmp_path / "b.png"])
    with pytest.raises(TypeError, match="unsupported image type int"):
        to_image_batch([3])
    with pytest.raises(ValueError, match="empty batch"):
        to_image_batch([])


def test_unreadable_image_file_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"definitely not a png")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="cannot read image"):
        to_image_batch([tmp_path / "bad.png"])
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(tmp_path / "absent.png")


def test_list_images_recurses_sorts_and_deduplicates(tmp_path):
    for name in ("b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.tif", "z/e.bmp"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).touch()  # listing goes by name only
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "sub" / "weights.safetensors").touch()
    found = list_images([tmp_path / "in"])
    assert [p.relative_to(tmp_path / "in").as_posix() for p in found] == \
        ["a.JPG", "b.png", "sub/c.webp", "sub/deeper/d.tif", "z/e.bmp"]
    # A file named explicitly is taken whatever its extension; repeats and overlaps are listed once.
    again = list_images([tmp_path / "in" / "notes.txt", tmp_path / "in", tmp_path / "in" / "b.png"])
    assert again == sorted(found + [tmp_path / "in" / "notes.txt"])
    assert list_images([tmp_path / "in" / "z"]) == [tmp_path / "in" / "z" / "e.bmp"]
    with pytest.raises(FileNotFoundError, match="input not found: .*missing"):
        list_images([tmp_path / "in", tmp_path / "missing"])


def test_exif_orientation_is_applied_as_viewers_show_it(tmp_path):
    array = np.zeros((10, 20, 3), np.uint8)
    array[:, :10] = 255  # left half white
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=100)
    tensor = load_image(tmp_path / "phone.jpg")
    assert tensor.shape == (3, 20, 10)  # upright: portrait
    assert tensor[:, :5].mean() > 0.9 and tensor[:, -5:].mean() < 0.1  # the white half is now on top


def test_float_images_in_0_255_are_refused_and_small_overshoots_clamped():
    with pytest.raises(ValueError, match=r"expected floats in \[0, 1\].*divide 0-255 images by 255"):
        to_image_batch(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(6)) * 255)
    batch = to_image_batch(torch.full((1, 3, 8, 8), 1.0001))
    assert batch.max() == 1.0  # clamped: exactly 1
