"""DMP → 3D through ComfyUI stand-ins: files under output/3d with ComfyUI's counters, the path Preview 3D
reads, and clear errors (wrong socket, sizes, field of view, no trimesh) that leave nothing behind."""

from __future__ import annotations

import sys

import pytest
import torch

from comfy_stubs import stand_ins


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui")
    stand_ins.install(root)
    module = stand_ins.load_pack()
    yield module, root
    stand_ins.unload_pack(module)
    stand_ins.uninstall()


def predictions(engine, height=12, width=16, batch=1):
    generator = torch.Generator().manual_seed(0)
    depth = torch.rand(batch, height, width, generator=generator) + 1.0
    normal = torch.nn.functional.normalize(torch.randn(batch, height, width, 3, generator=generator), dim=-1)
    albedo = torch.rand(batch, height, width, 3, generator=generator)
    seg = torch.randint(0, 4, (batch, height, width), generator=generator)

    def make(task, raw):
        return engine.Prediction(f"{task}-x", engine.AdapterInfo(task=task), raw, torch.zeros(batch, height, width, 3))

    return {"depth": make("depth", depth), "normal": make("normal", normal), "albedo": make("albedo", albedo),
            "segmentation": make("segmentation", seg)}


SETTINGS = dict(mode="mesh", file_format="glb", hfov_degrees=60.0, discontinuity=1.0, vertex_budget=1_000_000,
                filename_prefix="3d/DMP")


def test_the_node_saves_under_output_3d_and_returns_the_path_preview_3d_reads(pack):
    pytest.importorskip("trimesh")
    from asset_readers import Glb

    module, root = pack
    found = predictions(module.dmp_model, batch=2)
    node = module.NODE_CLASS_MAPPINGS["DMPTo3D"]()
    image = torch.rand(2, 12, 16, 3, generator=torch.Generator().manual_seed(1))
    out = node.export(found["depth"], image, **SETTINGS, normal=found["normal"], albedo=found["albedo"],
                      segmentation=found["segmentation"])
    assert out["result"] == ("3d/DMP_00001_.glb", "DMP_00001_.glb")
    assert [f["filename"] for f in out["ui"]["dmp_files"]] == ["DMP_00001_.glb", "DMP_00002_.glb"]
    glb = Glb(root / "output" / "3d" / "DMP_00001_.glb")  # Preview 3D: model_file under the output folder
    assert {name for name, _ in glb.primitives()} <= {"wall", "building", "sky", "floor"}
    assert glb.image().size == (16, 12)
    again = node.export(found["depth"], image, **{**SETTINGS, "mode": "point cloud", "file_format": "ply"})
    assert again["result"] == ("3d/DMP_00003_.ply", "DMP_00003_.ply")
    assert (root / "output" / "3d" / "DMP_00004_.ply").is_file()


def test_bad_inputs_stop_the_node_naming_the_problem_and_write_nothing(pack, monkeypatch):
    module, root = pack
    found = predictions(module.dmp_model)
    node = module.NODE_CLASS_MAPPINGS["DMPTo3D"]()
    image = torch.rand(1, 12, 16, 3)
    before = sorted((root / "output").rglob("*")) if (root / "output").exists() else []
    with pytest.raises(ValueError, match="DMP → 3D needs a depth prediction, but got a normal prediction"):
        node.export(found["normal"], image, **SETTINGS)
    with pytest.raises(ValueError, match="DMP → 3D needs a albedo prediction, but got a depth"):
        node.export(found["depth"], image, **SETTINGS, albedo=found["depth"])
    with pytest.raises(ValueError, match=r"DMP → 3D: the depth prediction .* is 1 x 12 x 16 .* 1 x 24 x 16"):
        node.export(found["depth"], torch.rand(1, 24, 16, 3), **SETTINGS)
    with pytest.raises(ValueError, match=r"hfov_degrees must be .* in \(1, 179\)"):
        node.export(found["depth"], image, **{**SETTINGS, "hfov_degrees": 179.0})
    with pytest.raises(ValueError, match="vertex_budget must be an integer of at least 4"):
        node.export(found["depth"], image, **{**SETTINGS, "vertex_budget": 3})
    monkeypatch.setitem(sys.modules, "trimesh", None)
    with pytest.raises(ImportError, match="DMP → 3D: .*pip install trimesh"):
        node.export(found["depth"], image, **SETTINGS)
    after = sorted((root / "output").rglob("*")) if (root / "output").exists() else []
    assert [p for p in after if p.is_file()] == [p for p in before if p.is_file()]
