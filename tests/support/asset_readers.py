"""Readers of .glb and .ply files written independently of trimesh (standard library, numpy, Pillow), so
that the files' tests and the end-to-end run check what a viewer would read, not what the writer meant.

glTF 2.0 binary: a 12-byte header, a JSON chunk and a BIN chunk (Khronos glTF 2.0 spec, section 4.4);
accessors read as typed arrays, the texture decoded from its buffer view. PLY: an ASCII header and
binary little-endian vertex records (the face list is not read).
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np

_COMPONENTS = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_WIDTHS = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}
_PLY_TYPES = {"float": "<f4", "float32": "<f4", "double": "<f8", "uchar": "u1", "uint8": "u1", "int": "<i4",
              "int32": "<i4", "uint": "<u4", "short": "<i2", "ushort": "<u2", "char": "i1"}


class Glb:
    """A .glb file: its JSON document (``gltf``) and binary chunk, with accessors and images decoded."""

    def __init__(self, path: str | Path):
        data = Path(path).read_bytes()
        magic, version, length = struct.unpack_from("<4sII", data, 0)
        assert magic == b"glTF" and version == 2 and length == len(data), (magic, version, length, len(data))
        json_length, json_type = struct.unpack_from("<I4s", data, 12)
        assert json_type == b"JSON"
        self.gltf = json.loads(data[20:20 + json_length])
        offset = 20 + json_length
        bin_length, bin_type = struct.unpack_from("<I4s", data, offset)
        assert bin_type == b"BIN\x00"
        self.binary = data[offset + 8:offset + 8 + bin_length]

    def view(self, index: int) -> bytes:
        view = self.gltf["bufferViews"][index]
        start = view.get("byteOffset", 0)
        return self.binary[start:start + view["byteLength"]]

    def accessor(self, index: int) -> np.ndarray:
        """An accessor's values [count] or [count, width] (normalized integers left as stored)."""
        accessor = self.gltf["accessors"][index]
        dtype, width = np.dtype(_COMPONENTS[accessor["componentType"]]), _WIDTHS[accessor["type"]]
        view = self.gltf["bufferViews"][accessor["bufferView"]]
        stride = view.get("byteStride", dtype.itemsize * width)
        raw = self.view(accessor["bufferView"])[accessor.get("byteOffset", 0):]
        rows = [np.frombuffer(raw, dtype, width, i * stride) for i in range(accessor["count"])] \
            if stride != dtype.itemsize * width else None
        values = np.stack(rows) if rows is not None else np.frombuffer(raw, dtype, accessor["count"] * width)
        return values.reshape(accessor["count"], width) if width > 1 else values.reshape(-1)

    def primitives(self) -> list[tuple[str, dict]]:
        """(mesh name, primitive) of every primitive of every mesh."""
        return [(mesh.get("name", ""), p) for mesh in self.gltf["meshes"] for p in mesh["primitives"]]

    def image(self, index: int = 0):
        """Image `index` decoded with Pillow."""
        from PIL import Image

        return Image.open(io.BytesIO(self.view(self.gltf["images"][index]["bufferView"])))


def read_ply(path: str | Path) -> tuple[dict[str, int], np.ndarray]:
    """({element: count}, the vertex records as a numpy structured array) of a binary little-endian PLY."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1].startswith("format binary_little_endian 1.0"), header[:2]
    counts, vertex_fields, element = {}, [], None
    for line in header:
        words = line.split()
        if words[0] == "element":
            element = words[1]
            counts[element] = int(words[2])
        elif words[0] == "property" and element == "vertex":
            vertex_fields.append((words[-1], _PLY_TYPES[words[1]]))
    vertices = np.frombuffer(data, np.dtype(vertex_fields), counts["vertex"], end)
    return counts, vertices
