"""A textured mesh from metric depth: the sampled pixel grid triangulated, cut at depth discontinuities.

Each quad of neighbouring grid vertices (a b / c d) gives the triangles (a, c, b) and (b, c, d),
counter-clockwise as seen from the camera, so that their front faces look at it (glTF's rule).
A triangle is kept when its three vertices have valid depth and

    (max depth - min depth) / min depth <= discontinuity

over them: a jump from a chair at 2 m to the wall at 3 m (0.5) is cut, while a smooth surface
changes little between neighbouring vertices. The threshold trades rubber sheets against holes
in surfaces seen at a grazing angle, whose depth also grows fast from vertex to vertex: between
neighbours 1 / f radians apart a plane seen at an angle theta from its normal changes by about
tan(theta) / f relatively, so 0.05 keeps planes up to 87 degrees at f = 500 px (a 512 px image
at 54 degrees) and up to 70 degrees on a 64 px one (f = 55 px).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tasks.palettes import ADE20K_CLASSES
from .camera import back_project, grid_indices, opencv_to_gltf, pixel_rays
from .cloud import check_depth_map, sample_normals


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh in glTF's frame (x right, y up, z toward the viewer; camera at the origin), metres.

    Attributes:
        vertices: float32 [N, 3].
        normals: float32 [N, 3], unit vertex normals in glTF's frame (DMP's, else from the triangles).
        uvs: float32 [N, 2], texture coordinates in glTF's convention: (0, 0) is the texture's
            top-left corner, v grows downward; each vertex's pixel centre.
        faces: int64 [F, 3], counter-clockwise seen from the camera.
        pixels: int64 [N, 2], (row, column) of each vertex's pixel.
        texture: float32 [H, W, 3] in [0, 1], the whole image (albedo, or the photo).
        face_classes: int64 [F], each triangle's ADE20K class id (its vertices' majority), or None.
    """

    vertices: torch.Tensor
    normals: torch.Tensor
    uvs: torch.Tensor
    faces: torch.Tensor
    pixels: torch.Tensor
    texture: torch.Tensor
    face_classes: torch.Tensor | None = None

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        """(name, faces [F_k]) per part: one per ADE20K class present (by class id), else ("mesh", all)."""
        if self.face_classes is None:
            return [("mesh", torch.arange(len(self.faces)))]
        return [(ADE20K_CLASSES[int(c)], torch.nonzero(self.face_classes == c).flatten())
                for c in torch.unique(self.face_classes)]


def grid_faces(height: int, width: int) -> torch.Tensor:
    """Triangles [2 (h - 1) (w - 1), 3] of an h x w vertex grid (row-major ids), two per quad."""
    ids = torch.arange(height * width).reshape(height, width)
    a, b, c, d = ids[:-1, :-1], ids[:-1, 1:], ids[1:, :-1], ids[1:, 1:]
    return torch.cat([torch.stack([a, c, b], -1).reshape(-1, 3), torch.stack([b, c, d], -1).reshape(-1, 3)])


def continuous_faces(faces: torch.Tensor, depth: torch.Tensor, valid: torch.Tensor,
                     discontinuity: float) -> torch.Tensor:
    """Whether each triangle [F, 3] of vertex ids has valid depth at its vertices and no jump over `discontinuity`.

    Args:
        depth: float [N], each vertex's depth; valid: bool [N].
        discontinuity: the largest (max - min) / min depth over a triangle that is kept.

    Returns:
        bool [F].
    """
    corners = depth[faces]  # [F, 3]
    low, high = corners.min(1).values, corners.max(1).values
    return valid[faces].all(1) & (high - low <= discontinuity * low)


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Cross products [F, 3] of each triangle's edges (b - a) x (c - a): length twice its area, the
    front side's normal for counter-clockwise triangles."""
    a, b, c = vertices[faces].unbind(1)
    return torch.linalg.cross(b - a, c - a)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit vertex normals [N, 3]: the area-weighted mean of the normals of the triangles around each
    vertex; a vertex whose triangles have no area faces the camera (at the origin)."""
    per_corner = face_normals(vertices, faces).repeat_interleave(3, 0)  # [3F, 3], in faces.flatten() order
    summed = torch.zeros_like(vertices).index_add_(0, faces.flatten(), per_corner)
    length = summed.norm(dim=-1, keepdim=True)
    toward_camera = -vertices / vertices.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.where(length > 1e-20, summed / length.clamp_min(1e-20), toward_camera)


def majority_class(classes: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Each triangle's class [F] from its vertices' classes [N]: the one two vertices share, else the first's."""
    a, b, c = classes[faces].unbind(1)
    return torch.where(b == c, b, a)


def build_mesh(depth: torch.Tensor, texture: torch.Tensor, hfov_degrees: float, vertex_budget: int,
               discontinuity: float, normals: torch.Tensor | None = None, normal_convention: str = "omnidata",
               classes: torch.Tensor | None = None) -> Mesh:
    """Triangulate the sampled pixel grid of a depth map (see the module docstring).

    Args:
        depth: float [H, W], metres (camera z); pixels without a finite, positive depth make holes.
        texture: float [H, W, 3] in [0, 1]: the albedo, or the image.
        hfov_degrees: horizontal field of view (``camera.check_hfov``).
        vertex_budget: at most this many vertices (``camera.grid_indices``).
        discontinuity: relative depth jump over which a triangle is removed (> 0).
        normals: float [H, W, 3], DMP's normals in `normal_convention`, or None (normals from the triangles).
        classes: int [H, W] ADE20K class ids (segmentation), or None: one part per class present.

    Returns:
        a Mesh holding only the vertices of kept triangles.
    """
    # 1. The sampled grid, back-projected: [h, w] vertices, all of them for now.
    valid = check_depth_map(depth)
    height, width = depth.shape
    if height < 2 or width < 2:
        raise ValueError(f"a mesh needs a depth map of at least 2 x 2 pixels, got {height} x {width}")
    rows, cols = grid_indices(height, width, vertex_budget)
    grid_depth = depth[rows][:, cols].float()
    points = opencv_to_gltf(back_project(grid_depth, pixel_rays(height, width, hfov_degrees, rows, cols)))
    # 2. Triangles of valid, continuous depth; the vertices they use, renumbered.
    faces = grid_faces(len(rows), len(cols))
    faces = faces[continuous_faces(faces, grid_depth.flatten(), valid[rows][:, cols].flatten(), discontinuity)]
    if len(faces) == 0:
        raise ValueError(f"no triangle is left: every one has invalid depth or a relative depth jump over "
                         f"discontinuity={discontinuity:g}; raise the threshold (or use a point cloud)")
    used = torch.zeros(len(rows) * len(cols), dtype=torch.bool)
    used[faces.flatten()] = True
    renumber = torch.cumsum(used, 0) - 1
    faces = renumber[faces]
    # 3. Per-vertex attributes: position, pixel, texture coordinate, normal, class.
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    pixels = torch.stack([grid_rows, grid_cols], -1).reshape(-1, 2)[used]
    vertices = points.reshape(-1, 3)[used]
    uvs = torch.stack([(pixels[:, 1] + 0.5) / width, (pixels[:, 0] + 0.5) / height], -1).float()
    geometric = vertex_normals(vertices, faces)
    if normals is not None:
        given = sample_normals(normals, normal_convention, rows, cols).reshape(-1, 3)[used]
        geometric = torch.where(given.norm(dim=-1, keepdim=True) > 0.5, given, geometric)
    face_classes = None if classes is None else majority_class(classes[rows][:, cols].flatten()[used].long(), faces)
    return Mesh(vertices=vertices, normals=geometric, uvs=uvs, faces=faces, pixels=pixels,
                texture=texture.float().clamp(0, 1), face_classes=face_classes)
