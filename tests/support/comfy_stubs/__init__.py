"""Test support for the node pack: ComfyUI stand-ins, loading the pack as ComfyUI does, and the
UI-to-API workflow converter (also used by tests/comfy_e2e.py against a real server)."""
