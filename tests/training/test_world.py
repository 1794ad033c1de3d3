"""The miniature world: deterministic scenes whose labels are exact by construction."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from training.demo.world import STYLES, WORLD_CLASSES, Camera, random_scene, render, write_dataset


def _plain_room(**changes):
    """A known room: camera 1.5 m high looking straight ahead, back wall at 5 m, no objects."""
    scene = dataclasses.replace(random_scene(0, 0), camera=Camera(height=1.5, pitch=0.0, yaw=0.0, hfov=1.0),
                                room_depth=5.0, room_half_width=2.0, room_height=3.0, objects=(),
                                painting=None)
    return dataclasses.replace(scene, **changes)


def test_scenes_are_a_pure_function_of_seed_and_index():
    a, b = render(random_scene(3, 7), 32, 32), render(random_scene(3, 7), 32, 32)
    for field in dataclasses.fields(a):  # the same numpy operations on the same inputs: exact
        assert np.array_equal(getattr(a, field.name), getattr(b, field.name))
    assert not np.array_equal(a.image, render(random_scene(3, 8), 32, 32).image)


@pytest.mark.parametrize("style", list(STYLES))
def test_labels_are_consistent(style):
    for index in range(4):
        view = render(random_scene(0, index, style), 48, 48)
        np.testing.assert_allclose(view.image, view.albedo * view.shading[..., None], atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(view.normal, axis=-1), 1.0, atol=1e-5)
        assert 0.3 < view.depth.min() and view.depth.max() < 8.0  # within DMP's range (target scale 8 m)
        assert set(np.unique(view.segmentation)) <= set(WORLD_CLASSES.values())
        assert 0 <= view.shading.min() and view.shading.max() <= 1
        # Every visible surface faces the camera: n . (pixel ray) < 0 in the camera frame.
        h, w = view.depth.shape
        focal = w / 2 / np.tan(random_scene(0, index, style).camera.hfov / 2)
        v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
        rays = np.stack([(u - w / 2) / focal, (v - h / 2) / focal, np.ones_like(u)], -1)
        assert ((view.normal * rays).sum(-1) < 1e-6).all()


def test_omnidata_convention_and_exact_depth():
    """Straight ahead: the back wall is (0, 0, -1) at its exact depth, floor (0, -1, 0), ceiling (0, 1, 0)."""
    view = render(_plain_room(), 33, 33)
    centre = (16, 16)
    assert view.segmentation[centre] == WORLD_CLASSES["wall"]
    np.testing.assert_allclose(view.normal[centre], [0, 0, -1], atol=1e-6)
    assert view.depth[centre] == pytest.approx(5.0, abs=1e-5)
    np.testing.assert_allclose(view.normal[-1, 16], [0, -1, 0], atol=1e-6)
    assert view.segmentation[-1, 16] == WORLD_CLASSES["floor"]
    np.testing.assert_allclose(view.normal[0, 16], [0, 1, 0], atol=1e-6)
    assert view.segmentation[0, 16] == WORLD_CLASSES["ceiling"]
    # Floor depth follows from the camera height: the bottom pixel row sees y = 1.5 at z = 1.5 * f / dv.
    focal = 33 / 2 / np.tan(0.5)
    expected = 1.5 * focal / (32.5 - 16.5)
    assert view.depth[-1, 16] == pytest.approx(expected, rel=1e-5)
    # The side walls (2 m away; visible from z = 2 / tan(0.5) = 3.7 m on) face the room.
    np.testing.assert_allclose(view.normal[16, 0], [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(view.normal[16, -1], [-1, 0, 0], atol=1e-6)


def test_write_dataset_layout(tmp_path):
    folder = write_dataset(tmp_path / "world", 3, size=16, seed=1, start=10)
    for name in ("images", "normal", "segmentation", "albedo", "shading"):
        assert sorted(p.name for p in (folder / name).glob("*.png")) == [f"000{i}.png" for i in (10, 11, 12)]
    depth = np.load(folder / "depth" / "00011.npy")
    assert depth.dtype == np.float32 and depth.shape == (16, 16)
    rows = [json.loads(line) for line in (folder / "images" / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == ["00010.png", "00011.png", "00012.png"]
    assert all(r["text"].startswith(("a room", "an empty room")) for r in rows)
    assert not list(folder.rglob(".*.tmp"))


def test_styles_follow_their_ranges_and_differ():
    for name, style in STYLES.items():
        for index in range(8):
            scene = random_scene(1, index, name)
            assert scene.style == name
            assert style.pitch[0] <= scene.camera.pitch <= style.pitch[1]
            assert style.height[0] <= scene.camera.height <= style.height[1]  # the scale cue every style keeps
            assert scene.floor_pattern in style.floor_patterns
            kinds = {obj.label for obj in scene.objects}
            allowed = {"column" if k == "pillar" else k for k in style.kinds}
            assert kinds <= allowed and style.objects[0] <= len(scene.objects) <= style.objects[1]
    images = {name: np.stack([render(random_scene(0, i, name), 32, 32).image for i in range(4)]) * 255
              for name in STYLES}
    means = {name: image.reshape(-1, 3).mean(0) for name, image in images.items()}
    assert abs(means["cellar"].mean() - means["playroom"].mean()) > 20  # dim cellars, bright playrooms


def test_an_unknown_style_names_the_known_ones():
    with pytest.raises(ValueError, match="style must be one of .*'bedrooms'.*got 'castle'"):
        random_scene(0, 0, "castle")
