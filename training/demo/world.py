"""A miniature world with perfect labels: procedural rooms ray-cast in numpy.

Real SD weights are gigabytes and real labelled scenes are scarce, so the trainer's embedded
default is this: a room (floor, walls, ceiling, sometimes a painting) holding a few boxes and
spheres, lit by one point light, seen by a pinhole camera. Every pixel is one ray, so the labels
are exact by construction:

- ``depth``: the z coordinate of the hit point in the camera frame, in metres (not ray length);
- ``normal``: the unit surface normal in the camera frame, Omnidata convention (OpenCV camera:
  x right, y down, z forward), so a wall facing the camera is (0, 0, -1) and a floor (0, -1, 0);
- ``segmentation``: ADE20K class ids (DMP palette), see WORLD_CLASSES;
- ``albedo`` (RGB) and ``shading`` (grey, ambient plus Lambertian point light with hard shadows),
  with ``image = albedo * shading`` exactly (no specular term, no anti-aliasing).

Scenes come in styles (``STYLES``): the same kind of room with other textures, colours, object
kinds, lighting and camera poses. "bedrooms" is the labelled domain of ``dmp demo`` (DMP's
adapters were trained on bedrooms); the others are its out-of-domain scenes, and all of them
together are the unlabelled images its diffusion prior is pre-trained on. Every style keeps the
scale cues of real rooms (a camera at about eye height, rooms of human size), so metric depth
stays readable from one image in all of them.

Scenes are a pure function of (seed, index, style) through numpy's SeedSequence. Coordinates: the
world frame is x right, y down, z forward, with the camera centre at the origin; the floor is
the plane y = camera height.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmp_model.options import check_option

logger = logging.getLogger(__name__)

# ADE20K class ids (0-based, as the DMP palette) of what the world contains.
WORLD_CLASSES = {"wall": 0, "floor": 3, "ceiling": 5, "bed": 7, "cabinet": 10, "table": 15,
                 "painting": 22, "box": 41, "column": 42, "ball": 119}
# The camera frame of the normals written by ``write_dataset`` (one of dmp_model's NORMAL_CONVENTIONS).
NORMAL_CONVENTION = "omnidata"
# Folder names of the targets written by ``write_dataset`` (the input images go to "images").
TARGET_FOLDERS = ("depth", "normal", "segmentation", "albedo", "shading")
# Bump when a scene of any style renders differently: cached priors record the version they saw.
WORLD_VERSION = 2
# Object kinds: the class they are labelled with and width, height, depth ranges in metres
# ("ball": radius, radius, radius). A pillar is a tall box labelled as a column.
_OBJECT_KINDS = {"cabinet": ("cabinet", (0.5, 1.1), (0.6, 1.4), (0.4, 0.6)),
                 "table": ("table", (0.8, 1.4), (0.45, 0.75), (0.6, 0.9)),
                 "bed": ("bed", (1.0, 1.6), (0.35, 0.55), (1.6, 2.0)),
                 "box": ("box", (0.3, 0.6), (0.3, 0.6), (0.3, 0.6)),
                 "pillar": ("column", (0.25, 0.45), (2.0, 2.6), (0.25, 0.45)),
                 "ball": ("ball", (0.2, 0.5), (0.2, 0.5), (0.2, 0.5))}
FLOOR_PATTERNS = ("tiles", "planks", "plain", "speckle")
WALL_PATTERNS = ("stripes", "plain", "bands")
_EPS = 1e-4


@dataclass(frozen=True)
class Style:
    """How the scenes of one style are drawn: ranges (low, high) and choices.

    Colours are a random brightness in `brightness` tinted by up to `tint` per channel (0: grey).
    """

    name: str
    kinds: tuple[str, ...] = ("cabinet", "table", "bed", "box", "ball")  # keys of _OBJECT_KINDS
    kind_weights: tuple[float, ...] = (0.175, 0.175, 0.175, 0.175, 0.3)
    objects: tuple[int, int] = (1, 4)  # count, inclusive
    pitch: tuple[float, float] = (0.1, 0.35)
    yaw: tuple[float, float] = (-0.3, 0.3)
    hfov: tuple[float, float] = (1.0, 1.2)
    height: tuple[float, float] = (1.45, 1.55)  # camera height (m): the scale cue
    half_width: tuple[float, float] = (1.8, 3.0)
    depth: tuple[float, float] = (4.0, 6.0)
    room_height: tuple[float, float] = (2.5, 3.0)
    tint: float = 0.25
    brightness: tuple[float, float] = (0.15, 0.9)
    wall_brightness: tuple[float, float] = (0.45, 0.9)
    floor_patterns: tuple[str, ...] = ("tiles",)
    floor_tile: tuple[float, float] = (0.5, 0.5)
    wall_patterns: tuple[str, ...] = ("stripes", "plain")
    painting: float = 0.6  # probability of a painting on the back wall
    ambient: tuple[float, float] = (0.15, 0.3)
    light_power: tuple[float, float] = (0.8, 1.0)


# "bedrooms" is the labelled domain; the others differ in what the issue calls style: textures,
# colours, object kinds, lighting and camera poses.
STYLES = {
    "bedrooms": Style("bedrooms"),
    "playroom": Style("playroom", kinds=("ball", "box"), kind_weights=(0.6, 0.4), objects=(3, 7), tint=0.45,
                      brightness=(0.3, 0.9), wall_brightness=(0.5, 0.95), floor_patterns=("tiles", "plain"),
                      floor_tile=(0.25, 0.4), wall_patterns=("plain", "bands"), painting=0.2, ambient=(0.3, 0.45),
                      pitch=(0.2, 0.5), yaw=(-0.5, 0.5)),
    "gallery": Style("gallery", kinds=("pillar", "box", "table"), kind_weights=(0.5, 0.25, 0.25), objects=(2, 5),
                     tint=0.06, brightness=(0.25, 0.85), wall_brightness=(0.7, 0.95), floor_patterns=("planks",),
                     floor_tile=(0.15, 0.3), wall_patterns=("plain",), painting=0.9, ambient=(0.2, 0.35),
                     pitch=(0.0, 0.2), yaw=(-0.45, 0.45), hfov=(1.1, 1.3), half_width=(2.5, 3.5),
                     depth=(5.0, 7.0), room_height=(2.8, 3.2)),
    "cellar": Style("cellar", kinds=("box", "cabinet", "ball"), kind_weights=(0.6, 0.25, 0.15), objects=(2, 6),
                    tint=0.12, brightness=(0.2, 0.6), wall_brightness=(0.3, 0.6), floor_patterns=("speckle", "tiles"),
                    floor_tile=(0.3, 0.6), wall_patterns=("bands", "plain"), painting=0.0, ambient=(0.05, 0.15),
                    light_power=(0.9, 1.0), pitch=(0.25, 0.5), yaw=(-0.35, 0.35), hfov=(0.9, 1.1),
                    half_width=(1.6, 2.4), room_height=(2.3, 2.6)),
    "office": Style("office", kinds=("table", "cabinet", "box"), kind_weights=(0.45, 0.4, 0.15), objects=(2, 5),
                    tint=0.15, brightness=(0.3, 0.8), wall_brightness=(0.55, 0.85),
                    floor_patterns=("speckle", "plain", "planks"), floor_tile=(0.3, 0.6),
                    wall_patterns=("stripes", "bands"), painting=0.4, ambient=(0.25, 0.4),
                    pitch=(0.05, 0.3), yaw=(-0.5, 0.5), hfov=(1.0, 1.3)),
}
IN_DOMAIN_STYLE = "bedrooms"


@dataclass(frozen=True)
class Camera:
    """A pinhole camera at the world origin; pitch > 0 looks down, yaw > 0 turns right (radians)."""

    height: float  # metres above the floor
    pitch: float
    yaw: float
    hfov: float  # horizontal field of view


@dataclass(frozen=True)
class Box:
    """A box resting on the floor, turned by `yaw` about the vertical axis."""

    label: str
    center: tuple[float, float, float]
    half_size: tuple[float, float, float]
    yaw: float
    colour: tuple[float, float, float]
    stripes: float  # stripe period in metres along the height, 0 for a plain box


@dataclass(frozen=True)
class Sphere:
    label: str
    center: tuple[float, float, float]
    radius: float
    colour: tuple[float, float, float]


@dataclass(frozen=True)
class Scene:
    """Everything ``render`` needs; built by ``random_scene``."""

    camera: Camera
    room_half_width: float
    room_depth: float  # z of the back wall
    room_height: float
    floor_colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    floor_tile: float
    wall_colour: tuple[float, float, float]
    wall_stripes: float
    ceiling_colour: tuple[float, float, float]
    painting: tuple[float, float, float, float] | None  # x0, x1, y0, y1 on the back wall
    painting_colours: tuple[tuple[float, float, float], ...]
    objects: tuple[Box | Sphere, ...]
    light: tuple[float, float, float]
    light_power: float
    ambient: float
    floor_pattern: str = "tiles"  # one of FLOOR_PATTERNS
    wall_pattern: str = "stripes"  # one of WALL_PATTERNS; "stripes" with wall_stripes 0 is plain
    style: str = IN_DOMAIN_STYLE


@dataclass
class WorldView:
    """One rendered view; all arrays [H, W, ...] float32 unless noted."""

    image: np.ndarray  # [H, W, 3] in [0, 1], = albedo * shading
    depth: np.ndarray  # [H, W] metres (camera z)
    normal: np.ndarray  # [H, W, 3] unit vectors, Omnidata convention
    segmentation: np.ndarray  # [H, W] uint8 ADE20K class ids
    albedo: np.ndarray  # [H, W, 3] in [0, 1]
    shading: np.ndarray  # [H, W] in [0, 1]
    caption: str


def _colour(rng: np.random.Generator, low: float = 0.15, high: float = 0.9,
            tint: float = 0.25) -> tuple[float, float, float]:
    """A random RGB albedo: a random brightness in [low, high], each channel tinted by up to `tint`."""
    base = rng.uniform(low, high)
    shift = rng.uniform(-tint, tint, size=3)
    return tuple(float(c) for c in np.clip(base + shift, 0.05, 0.95))


def get_style(style: str | Style) -> Style:
    """A Style from its name (one of STYLES) or itself."""
    if isinstance(style, Style):
        return style
    check_option("style", style, tuple(STYLES))
    return STYLES[style]


def _random_objects(rng: np.random.Generator, style: Style, camera: Camera, half_width: float,
                    depth: float) -> tuple[Box | Sphere, ...]:
    """The style's objects, resting on the floor between 1.6 m from the camera and the back wall."""
    objects: list[Box | Sphere] = []
    weights = np.asarray(style.kind_weights) / np.sum(style.kind_weights)
    for _ in range(rng.integers(style.objects[0], style.objects[1] + 1)):
        z = rng.uniform(1.6, depth - 0.6)
        x = rng.uniform(-half_width + 0.5, half_width - 0.5)
        label, *ranges = _OBJECT_KINDS[style.kinds[rng.choice(len(style.kinds), p=weights)]]
        colour = _colour(rng, *style.brightness, style.tint)
        if label == "ball":
            radius = rng.uniform(*ranges[0])
            objects.append(Sphere(label, (x, camera.height - radius, z), radius, colour))
        else:
            w, h, d = (rng.uniform(*r) / 2 for r in ranges)
            objects.append(Box(label, (x, camera.height - h, z), (w, h, d), rng.uniform(-0.8, 0.8), colour,
                               rng.choice([0.0, rng.uniform(0.1, 0.25)])))
    return tuple(objects)


def random_scene(seed: int, index: int, style: str | Style = IN_DOMAIN_STYLE) -> Scene:
    """A random room of `style` (a name in STYLES, default the in-domain "bedrooms"), reproducible
    from (seed, index, style name)."""
    style = get_style(style)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, zlib.crc32(style.name.encode())]))
    # Scale cues are consistent, as in real rooms (people hold cameras at eye height, tiles have
    # standard sizes): without them metric depth from one image would be ambiguous up to scale.
    camera = Camera(height=rng.uniform(*style.height), pitch=rng.uniform(*style.pitch),
                    yaw=rng.uniform(*style.yaw), hfov=rng.uniform(*style.hfov))
    half_width, depth, height = (rng.uniform(*style.half_width), rng.uniform(*style.depth),
                                 rng.uniform(*style.room_height))
    objects = _random_objects(rng, style, camera, half_width, depth)
    painting = None
    if rng.random() < style.painting:
        x0 = rng.uniform(-half_width + 0.3, half_width - 1.3)
        y0 = camera.height - rng.uniform(1.6, 2.2)
        painting = (x0, x0 + rng.uniform(0.6, 1.0), y0 - rng.uniform(0.4, 0.7), y0)
    wall_pattern = str(rng.choice(style.wall_patterns))
    return Scene(
        camera=camera, room_half_width=half_width, room_depth=depth, room_height=height,
        floor_colours=(_colour(rng, 0.2, 0.6, style.tint), _colour(rng, 0.4, 0.85, style.tint)),
        floor_tile=rng.uniform(*style.floor_tile), wall_colour=_colour(rng, *style.wall_brightness, style.tint),
        wall_stripes=0.0 if wall_pattern == "plain" else rng.uniform(0.15, 0.4),
        ceiling_colour=_colour(rng, 0.7, 0.95, style.tint), painting=painting,
        painting_colours=tuple(_colour(rng, tint=max(style.tint, 0.25)) for _ in range(3)), objects=objects,
        light=(rng.uniform(-half_width + 0.3, half_width - 0.3), camera.height - height + 0.3,
               rng.uniform(0.5, depth - 1.0)),
        light_power=rng.uniform(*style.light_power), ambient=rng.uniform(*style.ambient),
        floor_pattern=str(rng.choice(style.floor_patterns)), wall_pattern=wall_pattern, style=style.name)


def _rotation(pitch: float, yaw: float) -> np.ndarray:
    """World-from-camera rotation: pitch about x (down for > 0), then yaw about y (right for > 0)."""
    cp, sp, cy, sy = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    rx = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return ry @ rx


def _yaw_matrix(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _hit_box(origin: np.ndarray, dirs: np.ndarray, box: Box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slab test: ray parameter [N] (inf on a miss), world normals [N, 3], local hit points [N, 3]."""
    turn = _yaw_matrix(box.yaw)
    o = (origin - np.asarray(box.center)) @ turn  # world -> local is turn.T, applied to row vectors
    d = dirs @ turn
    half = np.asarray(box.half_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - o) / d, (half - o) / d
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = near.max(axis=1), far.min(axis=1)
    hit = (t_near <= t_far) & (t_near > _EPS)
    t = np.where(hit, t_near, np.inf)
    axis = near.argmax(axis=1)
    normal_local = np.zeros_like(d)
    normal_local[np.arange(len(d)), axis] = -np.sign(d[np.arange(len(d)), axis])
    return t, normal_local @ turn.T, o + np.where(hit, t, 0)[:, None] * d


def _hit_sphere(origin: np.ndarray, dirs: np.ndarray, sphere: Sphere) -> tuple[np.ndarray, np.ndarray]:
    """Ray parameter [N] (inf on a miss) and world normals [N, 3]."""
    oc = origin - np.asarray(sphere.center)
    a = (dirs * dirs).sum(1)
    b = 2 * (dirs * oc).sum(-1)
    c = (oc * oc).sum(-1) - sphere.radius**2
    disc = b * b - 4 * a * c
    root = np.sqrt(np.maximum(disc, 0))
    t = (-b - root) / (2 * a)
    t = np.where((disc >= 0) & (t > _EPS), t, np.inf)
    points = origin + np.where(np.isfinite(t), t, 0)[:, None] * dirs
    return t, (points - np.asarray(sphere.center)) / sphere.radius


def _hit_room(dirs: np.ndarray, scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where rays from the camera leave the room box: t [N], surface index [N] (0 side, 1 floor,
    2 ceiling, 3 back, 4 front) and inward world normals [N, 3]."""
    floor_y, ceiling_y = scene.camera.height, scene.camera.height - scene.room_height
    with np.errstate(divide="ignore", invalid="ignore"):
        tx = np.where(dirs[:, 0] > 0, scene.room_half_width, -scene.room_half_width) / dirs[:, 0]
        ty = np.where(dirs[:, 1] > 0, floor_y, ceiling_y) / dirs[:, 1]
        tz = np.where(dirs[:, 2] > 0, scene.room_depth, -1.0) / dirs[:, 2]
    ts = np.stack([np.abs(tx), np.abs(ty), np.abs(tz)], 1)
    axis = ts.argmin(1)
    t = ts[np.arange(len(dirs)), axis]
    down = dirs[:, 1] > 0
    surface = np.select([axis == 0, (axis == 1) & down, axis == 1, dirs[:, 2] > 0], [0, 1, 2, 3], 4)
    normals = np.zeros_like(dirs)
    normals[np.arange(len(dirs)), axis] = -np.sign(dirs[np.arange(len(dirs)), axis])
    return t, surface, normals


def _cast(origin: np.ndarray, dirs: np.ndarray, scene: Scene) -> np.ndarray:
    """Nearest object hit [N] (inf if none); the room never occludes a ray from inside it."""
    best = np.full(len(dirs), np.inf)
    for obj in scene.objects:
        t = _hit_box(origin, dirs, obj)[0] if isinstance(obj, Box) else _hit_sphere(origin, dirs, obj)[0]
        best = np.minimum(best, t)
    return best


def _room_albedo(points: np.ndarray, surface: np.ndarray, scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Albedo [N, 3] and class ids [N] of room surfaces: tiled floor, striped walls, a painting."""
    n = len(points)
    albedo = np.tile(np.asarray(scene.wall_colour), (n, 1))
    labels = np.full(n, WORLD_CLASSES["wall"])
    if scene.wall_stripes > 0:
        along = np.where(surface == 0, points[:, 2], points[:, 0])  # vertical stripes
        if scene.wall_pattern == "bands":
            along = points[:, 1]  # horizontal bands
        albedo = albedo * np.where(np.floor(along / scene.wall_stripes) % 2 == 0, 1.0, 0.85)[:, None]
    floor = surface == 1
    albedo[floor] = _floor_albedo(points[floor], scene)
    labels[floor] = WORLD_CLASSES["floor"]
    albedo[surface == 2] = scene.ceiling_colour
    labels[surface == 2] = WORLD_CLASSES["ceiling"]
    if scene.painting is not None:
        x0, x1, y0, y1 = scene.painting
        x, y = points[:, 0], points[:, 1]
        inside = (surface == 3) & (x > x0) & (x < x1) & (y > y0) & (y < y1)
        band = np.clip(((points[:, 1] - y0) / (y1 - y0) * 3).astype(int), 0, 2)
        albedo[inside] = np.asarray(scene.painting_colours)[band[inside]]
        labels[inside] = WORLD_CLASSES["painting"]
    return albedo, labels


def _floor_albedo(points: np.ndarray, scene: Scene) -> np.ndarray:
    """Floor albedo [N, 3] at floor points [N, 3] in the scene's pattern (FLOOR_PATTERNS)."""
    cell_x, cell_z = np.floor(points[:, 0] / scene.floor_tile), np.floor(points[:, 2] / scene.floor_tile)
    first, second = np.asarray(scene.floor_colours[0]), np.asarray(scene.floor_colours[1])
    if scene.floor_pattern == "plain":
        return np.tile(first, (len(points), 1))
    if scene.floor_pattern == "planks":  # boards running away from the camera, seams every tile
        mix = (cell_x % 2)[:, None] * 0.35
    elif scene.floor_pattern == "speckle":  # stone: a hashed grey level per small cell, no grid lines
        mix = (np.sin(cell_x * 12.9898 + cell_z * 78.233) * 43758.5453 % 1.0)[:, None] * 0.6
    else:  # tiles: a checkerboard of the two colours
        mix = ((cell_x + cell_z) % 2)[:, None]
    return first * (1 - mix) + second * mix


def render(scene: Scene, height: int = 64, width: int = 64) -> WorldView:
    """Ray-cast one view of `scene` at [height, width] pixels, with all its exact labels."""
    # 1. One ray per pixel centre; camera directions with z = 1, so the ray parameter is depth.
    cam = scene.camera
    focal = width / 2 / np.tan(cam.hfov / 2)
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    dirs_cam = np.stack([(u - width / 2) / focal, (v - height / 2) / focal, np.ones_like(u)], -1)
    dirs_cam = dirs_cam.reshape(-1, 3)
    rotation = _rotation(cam.pitch, cam.yaw)
    dirs = dirs_cam @ rotation.T  # [N, 3] world
    origin = np.zeros(3)
    # 2. The room, then every object in front of it.
    t, surface, normals = _hit_room(dirs, scene)
    albedo, labels = _room_albedo(dirs * t[:, None], surface, scene)
    for obj in scene.objects:
        if isinstance(obj, Box):
            t_obj, n_obj, local = _hit_box(origin, dirs, obj)
            colour = np.tile(np.asarray(obj.colour), (len(dirs), 1))
            if obj.stripes > 0:
                colour = colour * np.where(np.floor(local[:, 1] / obj.stripes) % 2 == 0, 1.0, 0.7)[:, None]
        else:
            t_obj, n_obj = _hit_sphere(origin, dirs, obj)
            colour = np.tile(np.asarray(obj.colour), (len(dirs), 1))
        closer = t_obj < t
        t = np.where(closer, t_obj, t)
        normals[closer], albedo[closer] = n_obj[closer], colour[closer]
        labels[closer] = WORLD_CLASSES[obj.label]
    # 3. Shading: ambient plus a point light with inverse-square-like falloff and hard shadows.
    points = dirs * t[:, None]
    to_light = np.asarray(scene.light) - points
    distance = np.linalg.norm(to_light, axis=1)
    to_light /= distance[:, None]
    lambert = np.clip((normals * to_light).sum(1), 0, None)
    shadowed = _cast(points + normals * 1e-3, to_light, scene) < distance
    falloff = 1.0 / (1.0 + (distance / 4.0) ** 2)
    direct = np.where(shadowed, 0.0, lambert * falloff * scene.light_power)
    shading = scene.ambient + (1 - scene.ambient) * np.clip(direct / 0.8, 0, 1)
    # 4. Camera-frame labels.
    normals_cam = normals @ rotation  # camera-from-world is rotation.T, applied to row vectors
    depth = t * dirs_cam[:, 2]
    shape = (height, width)
    albedo = albedo.reshape(*shape, 3).astype(np.float32)
    shading = shading.reshape(shape).astype(np.float32)
    return WorldView(image=albedo * shading[..., None], depth=depth.reshape(shape).astype(np.float32),
                     normal=normals_cam.reshape(*shape, 3).astype(np.float32),
                     segmentation=labels.reshape(shape).astype(np.uint8), albedo=albedo, shading=shading,
                     caption=caption(scene))


def caption(scene: Scene) -> str:
    """A short description, for the prompted training path ("a room with a table and a ball")."""
    names = sorted({obj.label for obj in scene.objects})
    things = [f"a {name}" for name in names] + (["a painting"] if scene.painting is not None else [])
    if not things:
        return "an empty room"
    return "a room with " + (", ".join(things[:-1]) + " and " + things[-1] if len(things) > 1 else things[0])


def scene_style(style: str | tuple[str, ...], index: int) -> str:
    """The style of scene `index` of a set drawn in `style` (one name, or names taken in turn)."""
    return style if isinstance(style, str) else style[index % len(style)]


def write_dataset(folder: str | os.PathLike, count: int, size: int = 64, seed: int = 0,
                  start: int = 0, style: str | tuple[str, ...] = IN_DOMAIN_STYLE) -> Path:
    """Render `count` scenes into the folder layout ``dmp train`` reads.

    Layout: ``images/{i:05d}.png`` (RGB, with ``images/metadata.jsonl`` captions in the Hugging
    Face ImageFolder layout), ``depth/*.npy`` (float32 metres), ``normal/*.png`` (RGB (n + 1) / 2,
    Omnidata), ``segmentation/*.png`` (mode L class ids), ``albedo/*.png``, ``shading/*.png`` (grey).

    Args:
        folder: destination (created).
        count: number of scenes; scene indices are start .. start + count - 1.
        size: image side in pixels.
        seed: world seed; a scene is a pure function of (seed, index).
        start: first scene index (train and validation splits use disjoint ranges).
        style: the scenes' style (a name in STYLES), or several names taken in turn by scene index.

    Returns:
        the folder.
    """
    from PIL import Image

    from dmp_model.io.writers import atomic_path

    folder = Path(folder)
    for name in ("images",) + TARGET_FOLDERS:
        (folder / name).mkdir(parents=True, exist_ok=True)
    captions = []
    for index in range(start, start + count):
        view = render(random_scene(seed, index, scene_style(style, index)), size, size)
        stem = f"{index:05d}"
        files = {
            "images": Image.fromarray(_to_uint8(view.image)),
            "normal": Image.fromarray(_to_uint8((view.normal + 1) / 2)),
            "segmentation": Image.fromarray(view.segmentation),
            "albedo": Image.fromarray(_to_uint8(view.albedo)),
            "shading": Image.fromarray(_to_uint8(view.shading)),
        }
        for name, image in files.items():
            with atomic_path(folder / name / f"{stem}.png") as temp:
                image.save(temp, format="PNG")
        with atomic_path(folder / "depth" / f"{stem}.npy") as temp, open(temp, "wb") as f:
            np.save(f, view.depth, allow_pickle=False)
        captions.append({"file_name": f"{stem}.png", "text": view.caption})
    with atomic_path(folder / "images" / "metadata.jsonl") as temp:
        temp.write_text("".join(json.dumps(c) + "\n" for c in captions), encoding="utf-8")
    logger.info("wrote %d world scenes (%dx%d) to %s", count, size, size, folder)
    return folder


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values, 0, 1) * 255).astype(np.uint8)
