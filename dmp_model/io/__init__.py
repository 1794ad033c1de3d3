"""Files on disk: raw outputs (16-bit PNG, NPY, EXR, previews), weight files, video."""
