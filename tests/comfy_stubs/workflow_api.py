"""ComfyUI workflows: the UI (litegraph) format -> the API format, and validation against node info.

Node info is what ComfyUI's ``GET /object_info`` returns for a node (``input``, ``input_order``,
``output``); ``object_info_of`` builds it for V1 classes the same way ComfyUI's server does.
The conversion follows ComfyUI's frontend: ``widgets_values`` hold one value per widget input,
in input order (required, then optional), including widgets whose input is linked; an INT named
seed / noise_seed or marked ``control_after_generate`` is followed by its control value
('fixed', 'randomize', ...), and an image- or video-upload combo by its upload button's value.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

CORE_NODES_FILE = Path(__file__).with_name("core_nodes.json")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# Nodes that exist only in the frontend: they are not sent to the server.
FRONTEND_ONLY = ("Note", "MarkdownNote")
_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")


def core_node_info() -> dict:
    """The checked-in object_info of the ComfyUI core nodes the example workflows use."""
    return json.loads(CORE_NODES_FILE.read_text(encoding="utf-8"))["nodes"]


def object_info_of(node_class) -> dict:
    """object_info of a V1 node class, as ComfyUI's server builds it."""
    inputs = node_class.INPUT_TYPES()
    return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
            "output": list(node_class.RETURN_TYPES),
            "output_name": list(getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES))}


def _options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_options(spec, files: dict[str, list[str]] | None = None) -> list | None:
    """The options of a combo input, or None if the input is not a combo."""
    kind = spec[0]
    if isinstance(kind, list):
        return kind
    if isinstance(kind, dict) and "files" in kind:  # a file list, which depends on the install
        return list((files or {}).get(kind["files"], []))
    if kind == "COMBO":
        return list(_options(spec).get("options", []))
    return None


def is_widget(spec) -> bool:
    """Whether an input is shown as a widget (and so has a value in widgets_values)."""
    kind = spec[0]
    return (not isinstance(kind, str) or kind in WIDGET_TYPES) and not _options(spec).get("forceInput")


def extra_widget_values(name: str, spec) -> int:
    """Widget values the frontend stores after this input's own (seed control, upload button)."""
    options = _options(spec)
    if spec[0] == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
        return 1
    if combo_options(spec) is not None and (options.get("image_upload") or options.get("video_upload")):
        return 1  # the upload button's value ("image" for both kinds)
    return 0


def _ordered_inputs(info: dict):
    """(name, spec, category) of a node's inputs, in the order the frontend lays out widgets."""
    for category in ("required", "optional"):
        for name in info.get("input_order", {}).get(category, list(info["input"].get(category, {}))):
            yield name, info["input"][category][name], category


def to_api(workflow: dict, node_info: dict) -> dict:
    """A UI-format workflow as an API-format prompt ({id: {class_type, inputs}}).

    Raises ValueError when a node is unknown, widget values do not line up with the widget
    inputs, or a required input is neither linked nor a widget.
    """
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):  # notes, muted, bypassed
            continue
        if kind not in node_info:
            raise ValueError(f"node {node['id']}: unknown node type {kind!r}")
        linked = {slot["name"]: links[slot["link"]] for slot in node.get("inputs", [])
                  if slot.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec, category in _ordered_inputs(node_info[kind]):
            if is_widget(spec):
                if not values:
                    raise ValueError(f"node {node['id']} ({kind}): no widget value for {name!r}")
                inputs[name] = values.pop(0)
                del values[:extra_widget_values(name, spec)]
            if name in linked:
                _link_id, origin, origin_slot, *_ = linked[name]
                inputs[name] = [str(origin), origin_slot]
            elif name not in inputs and category == "required":
                raise ValueError(f"node {node['id']} ({kind}): required input {name!r} is not connected")
        if values:
            raise ValueError(f"node {node['id']} ({kind}): {len(values)} widget values left over: {values}")
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs,
                                   "_meta": {"title": node.get("title", kind)}}
    return prompt


def _check_value(name: str, spec, value, files) -> str | None:
    """Why `value` is not accepted by the widget input `spec` (None if it is)."""
    options, kind = _options(spec), spec[0]
    choices = combo_options(spec, files)
    if choices is not None:
        return None if value in choices else f"{name}: {value!r} is not one of {choices[:12]}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}: {value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}: {value!r} is not a string"
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{name}: {value!r} is not an integer"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        return f"{name}: {value!r} is not a number"
    if "min" in options and value < options["min"] or "max" in options and value > options["max"]:
        return f"{name}: {value} is outside [{options.get('min')}, {options.get('max')}]"
    return None


def _types_match(sent: str, accepted) -> bool:
    if not isinstance(accepted, str):
        return False
    if "*" in (sent, accepted):
        return True
    return bool(set(sent.split(",")) & set(accepted.split(",")))


def validate(workflow: dict, node_info: dict, files: dict[str, list[str]] | None = None) -> list[str]:
    """Problems of a UI-format workflow: unknown nodes, bad widget values, mistyped or dangling links.

    Args:
        workflow: the UI-format JSON.
        node_info: object_info by node type.
        files: the files each model folder holds ({'checkpoints': [...], 'input': [...]}), for the
            combos that list files.
    """
    problems = []
    try:
        prompt = to_api(workflow, node_info)
    except ValueError as err:
        return [str(err)]
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node_id, entry in prompt.items():
        info = node_info[entry["class_type"]]
        for name, spec, _category in _ordered_inputs(info):
            value = entry["inputs"].get(name)
            if value is None or isinstance(value, list):
                continue
            problem = _check_value(name, spec, value, files)
            if problem:
                problems.append(f"node {node_id} ({entry['class_type']}): {problem}")
            if extra_widget_values(name, spec) and spec[0] == "INT":
                index = list(n for n, s, _ in _ordered_inputs(info) if is_widget(s)).index(name)
                control = _widget_after(nodes[int(node_id)], info, index)
                if control not in _CONTROL_VALUES:
                    problems.append(f"node {node_id}: control value {control!r} after {name!r} "
                                    f"is not one of {_CONTROL_VALUES}")
    problems += _link_problems(workflow, node_info, nodes)
    return problems


def _widget_after(node: dict, info: dict, index: int):
    """The widgets_values entry right after the index-th widget input (its control value)."""
    position = 0
    for i, (name, spec, _category) in enumerate(n for n in _ordered_inputs(info) if is_widget(n[1])):
        if i == index:
            return node["widgets_values"][position + 1]
        position += 1 + extra_widget_values(name, spec)
    raise IndexError(index)


def _link_problems(workflow: dict, node_info: dict, nodes: dict) -> list[str]:
    problems = []
    for link_id, origin, origin_slot, target, target_slot, kind in workflow.get("links", []):
        source, sink = nodes.get(origin), nodes.get(target)
        if source is None or sink is None:
            problems.append(f"link {link_id}: dangling (node {origin} or {target} missing)")
            continue
        outputs = node_info[source["type"]]["output"]
        if origin_slot >= len(outputs) or outputs[origin_slot] != kind:
            problems.append(f"link {link_id}: {source['type']} output {origin_slot} is not {kind}")
        if link_id not in (source["outputs"][origin_slot].get("links") or []):
            problems.append(f"link {link_id}: missing from {source['type']}'s output list")
        slot = sink["inputs"][target_slot] if target_slot < len(sink.get("inputs", [])) else None
        if slot is None or slot.get("link") != link_id:
            problems.append(f"link {link_id}: {sink['type']} input slot {target_slot} does not hold it")
            continue
        specs = {name: spec for name, spec, _ in _ordered_inputs(node_info[sink["type"]])}
        accepted = specs.get(slot["name"], [None])[0]
        if slot["name"] not in specs or not _types_match(kind, accepted):
            problems.append(f"link {link_id}: {kind} into {sink['type']}.{slot['name']} ({accepted})")
    return problems
