"""From DMP's predictions of one image to a 3D asset: a textured mesh or a point cloud, as .glb or .ply.

``camera`` back-projects metric depth through a pinhole camera; ``cloud`` and ``mesh`` build the
geometry (pure torch maths, no file-format library); ``export`` checks the predictions and writes
files with trimesh, an optional extra (``pip install trimesh``), imported only when a file is written.
"""
