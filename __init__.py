"""ComfyUI-DMP: DMP dense prediction (Lee et al., CVPR 2024) as ComfyUI nodes.

ComfyUI imports this folder as a package by its path (under a module name derived from that
path), so everything inside the pack is imported relatively. Importing loads no model.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
