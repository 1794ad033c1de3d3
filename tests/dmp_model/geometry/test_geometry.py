"""From depth to 3D: back-projection, meshes and point clouds with exact answers, the files read back
with readers independent of the writer, and the miniature world's exact geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmp_model import AdapterInfo, Prediction
from dmp_model.geometry import camera
from dmp_model.geometry.cloud import build_point_cloud
from dmp_model.geometry.export import AssetSettings, asset_predictions, export_assets
from dmp_model.geometry.mesh import build_mesh, face_normals
from dmp_model.tasks.normals import convert_normals
from training.demo import world

EPS = torch.finfo(torch.float32).eps


def plane_depth(normal, offset: float, height: int, width: int, hfov: float) -> torch.Tensor:
    """Depth [H, W] of the plane n . X = offset (OpenCV camera frame) at every pixel: z = offset / (n . ray)."""
    rays = camera.pixel_rays(height, width, hfov).double()
    return (offset / (rays @ torch.tensor(normal, dtype=torch.float64))).float()


def to_opencv(gltf: torch.Tensor) -> torch.Tensor:
    return gltf * torch.tensor([1.0, -1.0, -1.0])


# Camera ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hfov", [30.0, 60.0, 90.0, 150.0])
def test_a_fronto_parallel_plane_back_projects_at_its_depth_with_the_field_of_views_extent(hfov):
    d, height, width = 3.0, 6, 8
    cloud = build_point_cloud(torch.full((height, width), d), torch.zeros(height, width, 3), hfov, 10_000)
    points = cloud.points.reshape(height, width, 3)
    assert torch.equal(points[..., 2], torch.full((height, width), -d))  # glTF: the camera looks down -z
    half = d * math.tan(math.radians(hfov) / 2)  # half the plane's width seen across hfov
    # Pixel j's centre sits at (2 (j + 0.5) / W - 1) of the half width: the edges of the image at +-half.
    expected_x = half * (2 * (torch.arange(width, dtype=torch.float64) + 0.5) / width - 1)
    torch.testing.assert_close(points[0, :, 0].double(), expected_x, rtol=0, atol=4 * EPS * half)
    expected_y = half * (1 - 2 * (torch.arange(height, dtype=torch.float64) + 0.5) / width)  # square pixels, y up
    torch.testing.assert_close(points[:, 0, 1].double(), expected_y - half * (1 - height / width),
                               rtol=0, atol=4 * EPS * half)


@pytest.mark.parametrize("bad", [1.0, 179.0, 0.5, 180.0, -60.0, float("nan"), True, "60"])
def test_a_field_of_view_outside_the_open_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"hfov_degrees must be .* in \(1, 179\)"):
        camera.check_hfov(bad)
    with pytest.raises(ValueError, match="hfov_degrees"):
        AssetSettings(hfov_degrees=bad)


@pytest.mark.parametrize("size, budget", [((1536, 2048), 1_000_000), ((2160, 3840), 1_000_000), ((5, 3000), 16),
                                          ((40, 40), 1600), ((41, 40), 1600), ((3, 3), 4)])
def test_the_grid_keeps_to_the_vertex_budget_and_spans_the_image(size, budget):
    rows, cols = camera.grid_indices(*size, budget)
    assert len(rows) * len(cols) <= budget
    assert rows[0] == 0 and rows[-1] == size[0] - 1 and cols[0] == 0 and cols[-1] == size[1] - 1
    assert (rows.diff() > 0).all() and (cols.diff() > 0).all()
    if size[0] * size[1] > budget:  # uses most of the budget: within a row and a column of it
        assert len(rows) * len(cols) > budget - len(rows) - len(cols) - 1 or min(len(rows), len(cols)) == 2


@pytest.mark.parametrize("bad", [3, 0, -5, 2.5, True, None])
def test_a_vertex_budget_too_small_is_refused(bad):
    with pytest.raises(ValueError, match="vertex_budget must be an integer of at least 4"):
        AssetSettings(vertex_budget=bad)


# Meshes ------------------------------------------------------------------------------------------

TILTED = [(0.0, -0.8, -0.6), (0.3, -0.5, -0.812), (-0.36, 0.0, -0.933)]  # OpenCV frame, facing the camera


@pytest.mark.parametrize("normal", TILTED)
def test_a_tilted_planes_mesh_normals_are_the_planes_normal(normal):
    normal = torch.tensor(normal, dtype=torch.float64)
    normal = (normal / normal.norm()).tolist()
    depth = plane_depth(normal, -2.0, 24, 32, 70.0)  # n . X = -2: the plane 2 m from the camera
    mesh = build_mesh(depth, torch.rand(24, 32, 3, generator=torch.Generator().manual_seed(0)), 70.0, 10_000, 1.0)
    expected = to_opencv(torch.tensor(normal)).float()  # the same flip takes OpenCV to glTF and back
    assert len(mesh.faces) == 2 * 23 * 31  # nothing cut: the plane is continuous
    torch.testing.assert_close(mesh.normals, expected.expand_as(mesh.normals), rtol=0, atol=1e-5)
    # The triangles' own orientation (their winding) agrees: front faces look at the camera.
    faces = face_normals(mesh.vertices, mesh.faces)
    torch.testing.assert_close(faces / faces.norm(dim=-1, keepdim=True), expected.expand_as(faces), rtol=0, atol=1e-4)
    # And every vertex lies on the plane, n . X = -2 (in the OpenCV frame).
    torch.testing.assert_close(to_opencv(mesh.vertices).double() @ torch.tensor(normal, dtype=torch.float64),
                               torch.full((len(mesh.vertices),), -2.0, dtype=torch.float64), rtol=0, atol=1e-5)


def test_a_step_edge_leaves_no_triangle_spanning_it_and_the_threshold_is_what_decides():
    depth = torch.full((10, 12), 2.0)
    depth[:, 6:] = 3.0  # a chair at 2 m before a wall at 3 m: a jump of 50 %
    cut = build_mesh(depth, torch.zeros(10, 12, 3), 60.0, 10_000, 0.05)
    corners = to_opencv(cut.vertices)[:, 2][cut.faces]  # [F, 3] depths
    assert ((corners.max(1).values - corners.min(1).values) == 0).all()
    assert len(cut.faces) == 2 * 9 * 5 * 2  # both sides whole, the 9 quads across the edge gone
    kept = build_mesh(depth, torch.zeros(10, 12, 3), 60.0, 10_000, 0.6)  # above 50 %: a rubber sheet
    assert len(kept.faces) == 2 * 9 * 11


def test_invalid_depth_makes_holes_and_unused_vertices_are_dropped():
    depth = torch.full((5, 5), 2.0)
    depth[2, 2] = 0.0
    depth[0, 0] = float("nan")
    mesh = build_mesh(depth, torch.zeros(5, 5, 3), 60.0, 10_000, 0.05)
    assert len(mesh.vertices) == 23 and not ((mesh.pixels == torch.tensor([2, 2])).all(1)).any()
    assert len(mesh.faces) == 2 * 16 - 6 - 1  # 6 triangles touch the centre, 1 the corner


def test_dmp_normals_become_the_vertex_normals_in_the_glTF_frame():
    depth = torch.full((4, 4), 2.0)
    given = torch.tensor([0.6, 0.8, 0.0]).expand(4, 4, 3)  # Omnidata: right and down
    mesh = build_mesh(depth, torch.zeros(4, 4, 3), 60.0, 100, 0.05, given, "omnidata")
    torch.testing.assert_close(mesh.normals, torch.tensor([0.6, -0.8, 0.0]).expand(16, 3))  # glTF: y up
    marigold = convert_normals(given[None], "omnidata", "marigold")[0]  # the same normals in another frame
    same = build_mesh(depth, torch.zeros(4, 4, 3), 60.0, 100, 0.05, marigold * 3, "marigold")  # renormalised
    torch.testing.assert_close(same.normals, mesh.normals)


def test_the_vertex_budget_samples_pixels_exactly_on_the_surface():
    normal = [0.0, -0.6, -0.8]
    depth = plane_depth(normal, -2.0, 300, 400, 60.0)
    mesh = build_mesh(depth, torch.zeros(300, 400, 3), 60.0, 1000, 0.5)
    assert len(mesh.vertices) <= 1000 and len(mesh.vertices) > 900
    on_plane = to_opencv(mesh.vertices).double() @ torch.tensor(normal, dtype=torch.float64)
    torch.testing.assert_close(on_plane, torch.full_like(on_plane, -2.0), rtol=0, atol=1e-5)
    rows, cols = mesh.pixels.unbind(1)
    torch.testing.assert_close(mesh.uvs, torch.stack([(cols + 0.5) / 400, (rows + 0.5) / 300], -1).float())


def test_segmentation_splits_the_mesh_into_one_named_part_per_class():
    depth = torch.full((6, 8), 2.0)
    classes = torch.zeros(6, 8, dtype=torch.long)
    classes[3:] = 3  # wall above, floor below (ADE20K ids 0 and 3)
    mesh = build_mesh(depth, torch.zeros(6, 8, 3), 60.0, 1000, 0.05, classes=classes)
    parts = mesh.parts()
    assert [name for name, _ in parts] == ["wall", "floor"]
    assert sorted(torch.cat([faces for _, faces in parts]).tolist()) == list(range(len(mesh.faces)))
    rows = mesh.pixels[:, 0][mesh.faces]  # [F, 3]: a triangle's class is its vertices' majority
    assert ((rows >= 3).sum(1)[parts[1][1]] >= 2).all() and ((rows >= 3).sum(1)[parts[0][1]] <= 1).all()


# Point clouds ------------------------------------------------------------------------------------

def test_the_point_cloud_has_one_coloured_point_per_valid_pixel():
    generator = torch.Generator().manual_seed(1)
    depth = torch.rand(5, 7, generator=generator) + 1
    depth[1, 1] = -1.0
    colors = torch.rand(5, 7, 3, generator=generator)
    cloud = build_point_cloud(depth, colors, 60.0, 1000)
    assert len(cloud.points) == 34 and cloud.normals is None
    rows, cols = cloud.pixels.unbind(1)
    torch.testing.assert_close(cloud.colors, colors[rows, cols])
    torch.testing.assert_close(-cloud.points[:, 2], depth[rows, cols])


def world_view(seed: int = 0, index: int = 5, height: int = 48, width: int = 64):
    scene = world.random_scene(seed, index)
    return scene, world.render(scene, height, width)


def test_the_miniature_worlds_true_depth_gives_its_surfaces_to_float_precision():
    """The world's 3D points, by its own geometry: floor, ceiling and walls are planes, balls are spheres."""
    scene = next(s for s in (world.random_scene(0, i) for i in range(40))
                 if any(isinstance(o, world.Sphere) for o in s.objects))
    view = world.render(scene, 48, 64)
    cloud = build_point_cloud(torch.from_numpy(view.depth), torch.from_numpy(view.albedo),
                              math.degrees(scene.camera.hfov), 100_000, torch.from_numpy(view.normal))
    assert len(cloud.points) == 48 * 64
    # glTF -> OpenCV camera -> world (the renderer's own rotation), in float64.
    rotation = torch.from_numpy(world._rotation(scene.camera.pitch, scene.camera.yaw))
    points = to_opencv(cloud.points).double() @ rotation.T  # [N, 3]
    labels = torch.from_numpy(view.segmentation).flatten()
    tolerance = 8 * EPS * float(points.norm(dim=-1).max())  # float32 depth and rays, a few roundings
    x, y, z = points.unbind(1)
    c = world.WORLD_CLASSES
    floor, ceiling = labels == c["floor"], labels == c["ceiling"]
    assert floor.any() and ceiling.any()
    assert (y[floor] - scene.camera.height).abs().max() < tolerance
    assert (y[ceiling] - (scene.camera.height - scene.room_height)).abs().max() < tolerance
    walls = labels == c["wall"]
    on_a_wall = torch.minimum((x[walls].abs() - scene.room_half_width).abs(), (z[walls] - scene.room_depth).abs())
    assert on_a_wall.max() < tolerance
    balls = [o for o in scene.objects if isinstance(o, world.Sphere)]
    on_ball = labels == c["ball"]
    assert on_ball.any()
    distance = torch.stack([((points[on_ball] - torch.tensor(b.center)).norm(dim=-1) - b.radius).abs() for b in balls])
    assert distance.min(0).values.max() < tolerance
    # The normals are the world's, in glTF's frame.
    torch.testing.assert_close(cloud.normals, to_opencv(torch.from_numpy(view.normal).reshape(-1, 3)), rtol=0,
                               atol=1e-6)


# Predictions and files -----------------------------------------------------------------------------

def prediction(task: str, raw: torch.Tensor, **facts) -> Prediction:
    return Prediction(f"{task}-test", AdapterInfo(task=task, **facts), raw, torch.zeros(*raw.shape[:3], 3))


@pytest.fixture
def scene():
    """A world view as a batch of one image with its predictions (here: its exact labels)."""
    sc, view = world_view()
    image = torch.from_numpy(view.image).permute(2, 0, 1)[None]
    predictions = {"depth": prediction("depth", torch.from_numpy(view.depth)[None]),
                   "normal": prediction("normal", torch.from_numpy(view.normal)[None]),
                   "albedo": prediction("albedo", torch.from_numpy(view.albedo)[None]),
                   "segmentation": prediction("segmentation", torch.from_numpy(view.segmentation).long()[None])}
    return sc, view, image, predictions


def test_the_glb_read_back_independently_holds_the_mesh_its_texture_and_unit_normals(tmp_path, scene):
    pytest.importorskip("trimesh")
    from asset_readers import Glb

    sc, view, image, predictions = scene
    settings = AssetSettings(hfov_degrees=math.degrees(sc.camera.hfov), discontinuity=0.3)
    (path,) = export_assets([tmp_path / "room.glb"], image, predictions, settings)
    glb = Glb(path)
    by_task = asset_predictions(predictions)
    mesh = build_mesh(by_task["depth"].raw[0], by_task["albedo"].raw[0], settings.hfov_degrees,
                      settings.vertex_budget, settings.discontinuity, by_task["normal"].raw[0], "omnidata",
                      by_task["segmentation"].raw[0])
    parts = dict(mesh.parts())
    primitives = glb.primitives()
    assert sorted(name for name, _ in primitives) == sorted(parts)  # one node per class present, named
    assert {n["name"] for n in glb.gltf["nodes"]} == set(parts)
    assert len(glb.gltf["images"]) == 1 and glb.image().size == (view.albedo.shape[1], view.albedo.shape[0])
    texture = np.asarray(glb.image().convert("RGB"))
    assert np.abs(texture.astype(float) - view.albedo * 255).max() <= 0.5 + 1e-3  # the albedo, not the photo
    faces = 0
    for name, primitive in primitives:
        attributes = primitive["attributes"]
        positions, normals = glb.accessor(attributes["POSITION"]), glb.accessor(attributes["NORMAL"])
        uvs, indices = glb.accessor(attributes["TEXCOORD_0"]), glb.accessor(primitive["indices"]).reshape(-1, 3)
        part = mesh.faces[parts[name]]
        used = torch.unique(part)
        assert len(positions) == len(used) and len(indices) == len(part)
        np.testing.assert_array_equal(positions, mesh.vertices[used].numpy())
        np.testing.assert_allclose(uvs, mesh.uvs[used].numpy(), atol=1e-6)  # (0, 0): the texture's top left
        assert np.isfinite(normals).all()
        np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(normals, mesh.normals[used].numpy(), atol=1e-6)
        material = glb.gltf["materials"][primitive["material"]]["pbrMetallicRoughness"]
        assert "baseColorTexture" in material and material["metallicFactor"] == 0
        faces += len(indices)
    assert faces == len(mesh.faces)


def test_the_ply_point_cloud_read_back_holds_points_colours_and_normals(tmp_path, scene):
    pytest.importorskip("trimesh")
    from asset_readers import read_ply

    sc, view, image, predictions = scene
    settings = AssetSettings(hfov_degrees=math.degrees(sc.camera.hfov), mode="point cloud", file_format="ply")
    (path,) = export_assets([tmp_path / "room.ply"], image, predictions, settings)
    counts, vertices = read_ply(path)
    assert counts["vertex"] == view.depth.size and counts.get("face", 0) == 0
    cloud = build_point_cloud(torch.from_numpy(view.depth), torch.from_numpy(view.albedo), settings.hfov_degrees,
                              settings.vertex_budget, torch.from_numpy(view.normal))
    np.testing.assert_array_equal(np.stack([vertices[k] for k in "xyz"], 1), cloud.points.numpy())
    np.testing.assert_allclose(np.stack([vertices[k] for k in ("nx", "ny", "nz")], 1), cloud.normals.numpy())
    rgb = np.stack([vertices[k] for k in ("red", "green", "blue")], 1)
    np.testing.assert_array_equal(rgb, np.round(view.albedo.reshape(-1, 3) * 255).astype(np.uint8))


def test_a_glb_point_cloud_and_a_ply_mesh_are_written_too(tmp_path, scene):
    pytest.importorskip("trimesh")
    from asset_readers import Glb, read_ply

    sc, _view, image, predictions = scene
    hfov = math.degrees(sc.camera.hfov)
    points, = export_assets([tmp_path / "p.glb"], image, predictions, AssetSettings(hfov, "point cloud", "glb"))
    (_, primitive), = Glb(points).primitives()
    assert primitive["mode"] == 0 and len(Glb(points).accessor(primitive["attributes"]["POSITION"])) == 48 * 64
    mesh, = export_assets([tmp_path / "m.ply"], image, predictions, AssetSettings(hfov, "mesh", "ply", 0.3))
    counts, vertices = read_ply(mesh)
    assert counts["face"] > 0 and np.isfinite(vertices["nx"]).all()


# Bad input ---------------------------------------------------------------------------------------

def test_bad_predictions_are_refused_by_name_and_nothing_is_written(tmp_path, scene):
    _sc, _view, image, predictions = scene
    with pytest.raises(ValueError, match=r"needs a depth prediction .* got only \['albedo', 'normal'\]"):
        export_assets([tmp_path / "a.glb"], image, {k: predictions[k] for k in ("normal", "albedo")})
    small = {**predictions, "albedo": prediction("albedo", torch.rand(1, 24, 32, 3))}
    with pytest.raises(ValueError, match=r"the albedo prediction \('albedo-test'\) is 1 x 24 x 32 .* 1 x 48 x 64"):
        export_assets([tmp_path / "a.glb"], image, small)
    with pytest.raises(ValueError, match="two depth predictions"):
        export_assets([tmp_path / "a.glb"], image, {**predictions, "other": predictions["depth"]})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("depth, message", [(torch.zeros(1, 0, 0), "empty"), (torch.zeros(1, 4, 4), "no valid"),
                                            (torch.full((1, 4, 4), float("nan")), "no valid")])
def test_empty_or_all_invalid_depth_is_refused(tmp_path, depth, message):
    image = torch.zeros(1, 3, *depth.shape[1:])
    with pytest.raises(ValueError, match=message):
        export_assets([tmp_path / "a.glb"], image, {"d": prediction("depth", depth)})
    assert list(tmp_path.iterdir()) == []


def test_a_bad_image_of_a_batch_leaves_no_file_of_the_batch(tmp_path, scene, monkeypatch):
    pytest.importorskip("trimesh")
    from dmp_model.geometry import export

    depth = torch.full((2, 8, 8), 2.0)
    depth[1] = 0.0  # the second image has no valid depth: found before the first file is written
    paths = [tmp_path / "0.glb", tmp_path / "1.glb"]
    with pytest.raises(ValueError, match="no valid"):
        export_assets(paths, torch.zeros(2, 3, 8, 8), {"d": prediction("depth", depth)})
    assert list(tmp_path.iterdir()) == []
    calls = []
    original = export.write_asset

    def fail_second(path, asset, file_format):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(path, asset, file_format)

    monkeypatch.setattr(export, "write_asset", fail_second)
    with pytest.raises(OSError, match="disk full"):
        export_assets(paths, torch.zeros(2, 3, 8, 8), {"d": prediction("depth", torch.full((2, 8, 8), 2.0))})
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_without_trimesh_the_error_says_how_to_install_it(tmp_path, scene, monkeypatch):
    import sys

    _sc, _view, image, predictions = scene
    monkeypatch.setitem(sys.modules, "trimesh", None)  # import trimesh raises ImportError
    with pytest.raises(ImportError, match="pip install trimesh"):
        export_assets([tmp_path / "a.glb"], image, predictions)
    assert list(tmp_path.iterdir()) == []


def test_no_triangle_left_says_which_threshold():
    depth = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    with pytest.raises(ValueError, match="discontinuity=0.05"):
        build_mesh(depth, torch.zeros(2, 2, 3), 60.0, 100, 0.05)
