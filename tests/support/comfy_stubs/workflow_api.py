"""ComfyUI workflows: the UI (litegraph) format -> the API format, and validation against node info.

Node info is what ComfyUI's ``GET /object_info`` returns for a node (``input``, ``input_order``,
``output``); ``object_info_of`` builds it for V1 classes the same way ComfyUI's server does, and
``core_node_info`` reads a checked-in snapshot of the core nodes (one per core version, see
core_nodes/README.md).

The conversion follows ComfyUI's frontend:

- ``widgets_values`` hold one value per widget, in input order (required, then optional),
  including widgets whose input is linked. An INT named seed / noise_seed or marked
  ``control_after_generate`` is followed by its control value ('fixed', 'randomize', ...). A node
  with an image- or video-upload combo ends with its upload button's value: the frontend adds the
  button as one more input, which input_order does not list, so it comes after the optional ones
  (getOrderedInputSpecs, frontend 1.27.10 and 1.58.1).
- A DynamicCombo (``COMFY_DYNAMICCOMBO_V3``, newer cores) is one widget holding the chosen option's
  key, followed by the widgets of that option's inputs, recursively. Their prompt keys are dotted
  paths (``format``, ``format.codec``, ``format.codec.encoding``): the frontend names the widgets so
  (extensionService's dynamicComboWidget, comfyui-frontend-package 1.58.1) and the server rebuilds
  the nested value from them (``finalize_prefix``/``build_nested_inputs`` in core's
  comfy_api/latest/_io.py).
- A save from an older frontend or core may lack trailing optional widgets that a newer core
  added (CreateVideo's ``bit_depth``): they take the schema's default, as the frontend does. A
  missing required widget is an error: positional values must still line up.
- Frontends from 1.4x on also save ``widgets_values_named`` ({widget name: value}, the same
  widgets). It is read in preference, and where both are saved they must agree.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path

CORE_NODES_DIR = Path(__file__).with_name("core_nodes")
# The snapshots of core node info, by core version (files in CORE_NODES_DIR).
CORE_SNAPSHOTS = ("0.3.64", "newest")
INSTALLED_CORE = "0.3.64"  # the ComfyUI the e2e and the real-ComfyUI tests run
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
# Input types the frontend shows as widgets (its widget registry, 1.58.1): each has a value in
# widgets_values. A type not listed is a socket only.
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO, "VIDEO_EDIT", "IMAGEUPLOAD",
                "MARKDOWN", "TEXTAREA", "CURVE", "RANGE", "COLOR", "COLORS", "BOUNDING_BOX", "BOUNDING_BOXES",
                "IMAGECOMPARE", "PAINTER", "COMPOSITOR", "RESOLUTION_PREVIEW")
# Nodes that exist only in the frontend: they are not sent to the server.
FRONTEND_ONLY = ("Note", "MarkdownNote")
# Widgets a node's frontend extension adds after the schema's, not sent to the server: Preview 3D's
# viewer canvas (saved as '' by frontend 1.27.10 when the graph is re-saved).
VIEWER_WIDGETS = {"Preview3D": 1}
_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# The names newer frontends give the extra widgets in widgets_values_named.
_CONTROL_WIDGET, _UPLOAD_WIDGET = "control_after_generate", "upload"
_MISSING = object()


def core_node_info(version: str = INSTALLED_CORE) -> dict:
    """The checked-in object_info of the ComfyUI core nodes the example workflows use.

    Args:
        version: one of CORE_SNAPSHOTS ('0.3.64': dumped from that server; 'newest': derived from
            the newest public core sources).
    """
    if version not in CORE_SNAPSHOTS:
        raise ValueError(f"version {version!r} has no core node snapshot; expected one of {CORE_SNAPSHOTS}")
    return json.loads((CORE_NODES_DIR / f"{version}.json").read_text(encoding="utf-8"))["nodes"]


def core_snapshot_source(version: str) -> dict:
    """Where a snapshot came from (its 'source' record: core version, commits, date, frontend)."""
    return json.loads((CORE_NODES_DIR / f"{version}.json").read_text(encoding="utf-8"))["source"]


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
    if kind == DYNAMIC_COMBO:
        return [option["key"] for option in _options(spec).get("options", [])]
    return None


def widget_kind(spec) -> str:
    """The widget type the frontend makes for an input: 'COMBO' for any list, else ``widgetType``
    (a MultiType input names its widget so) or the input type."""
    kind = spec[0]
    if not isinstance(kind, str):
        return "COMBO"
    return _options(spec).get("widgetType", kind)


def is_widget(spec) -> bool:
    """Whether an input is shown as a widget (and so has a value in widgets_values)."""
    return widget_kind(spec) in WIDGET_TYPES and not _options(spec).get("forceInput")


def has_control_widget(name: str, spec) -> bool:
    """Whether the frontend stores a control value ('fixed', ...) right after this input's own."""
    options = _options(spec)
    return widget_kind(spec) == "INT" and bool(options.get("control_after_generate")
                                               or name.rsplit(".", 1)[-1] in ("seed", "noise_seed"))


def has_upload_button(spec) -> bool:
    """Whether this input gives its node an upload button (whose value ends the node's widget values)."""
    options = _options(spec)
    return widget_kind(spec) == "COMBO" and bool(options.get("image_upload") or options.get("video_upload"))


def default_value(key: str, spec):
    """The value the frontend gives a widget that a save does not hold: the schema's default, else
    a combo's first option."""
    options = _options(spec)
    if "default" in options:
        return options["default"]
    choices = combo_options(spec)
    if choices:
        return choices[0]
    raise ValueError(f"widget {key!r} has no saved value and its input declares no default: {spec}")


def _ordered(inputs: dict, order: dict | None = None):
    """(name, spec, category) of inputs in the order the frontend lays out widgets."""
    for category in ("required", "optional"):
        names = (order or {}).get(category, list(inputs.get(category, {})))
        for name in names:
            yield name, inputs[category][name], category


def _ordered_inputs(info: dict):
    return _ordered(info["input"], info.get("input_order"))


@dataclass
class _NodeInputs:
    """One node's inputs after conversion: prompt values, the spec of every input (dynamic ones
    expanded to their dotted keys), and the control value saved after each seed."""

    values: dict = field(default_factory=dict)
    specs: dict = field(default_factory=dict)
    controls: dict = field(default_factory=dict)


class _Positional:
    """widgets_values: taken in order."""

    def __init__(self, values: list):
        self.values = list(values)

    def take(self, _name: str):
        return self.values.pop(0) if self.values else _MISSING

    def leftover(self) -> list:
        return self.values


class _Named:
    """widgets_values_named: taken by widget name."""

    def __init__(self, values: dict):
        self.values = dict(values)

    def take(self, name: str):
        return self.values.pop(name, _MISSING)

    def leftover(self) -> list:
        return [f"{k}={v!r}" for k, v in self.values.items()]


def _walk(inputs: dict, order: dict | None, prefix: str, optional: bool, source, out: _NodeInputs, where: str):
    """Read the widget values of `inputs` (and of each DynamicCombo's chosen option) from `source`."""
    for name, spec, category in _ordered(inputs, order):
        key = prefix + name
        out.specs[key] = spec
        if not is_widget(spec):
            continue
        value = source.take(key)
        if value is _MISSING:
            if not (optional or category == "optional"):
                raise ValueError(f"{where}: no widget value for {key!r}")
            value = default_value(key, spec)
        out.values[key] = value
        if has_control_widget(key, spec):
            control = source.take(_CONTROL_WIDGET)
            if control is not _MISSING:
                out.controls[key] = control
        if widget_kind(spec) == DYNAMIC_COMBO:
            chosen = {option["key"]: option["inputs"] for option in _options(spec).get("options", [])}
            if value not in chosen:
                raise ValueError(f"{where}: {key}: {value!r} is not one of {list(chosen)}")
            _walk(chosen[value], None, key + ".", optional or category == "optional", source, out, where)


def _read_widgets(node: dict, info: dict, source) -> _NodeInputs:
    where = f"node {node['id']} ({node['type']})"
    out = _NodeInputs()
    _walk(info["input"], info.get("input_order"), "", False, source, out, where)
    if any(has_upload_button(spec) for _name, spec, _category in _ordered_inputs(info)):
        source.take(_UPLOAD_WIDGET)  # the button's value ("image" for images and videos alike) is not sent
    if len(source.leftover()) > VIEWER_WIDGETS.get(node["type"], 0):
        raise ValueError(f"{where}: {len(source.leftover())} widget values left over: {source.leftover()}")
    return out


def node_inputs(node: dict, info: dict) -> _NodeInputs:
    """A UI node's widget values as prompt inputs, from widgets_values_named when saved (checked
    against widgets_values when both are), else from widgets_values."""
    positional = node.get("widgets_values")
    named = node.get("widgets_values_named")
    if isinstance(positional, dict):  # old saves of some nodes keep a dict here
        positional, named = None, {**positional, **(named or {})}
    if named is None:
        return _read_widgets(node, info, _Positional(positional or []))
    result = _read_widgets(node, info, _Named(named))
    if positional is not None:
        by_position = _read_widgets(node, info, _Positional(positional))
        for part in ("values", "controls"):
            a, b = getattr(result, part), getattr(by_position, part)
            differ = sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))
            if differ:
                raise ValueError(f"node {node['id']} ({node['type']}): widgets_values_named and widgets_values "
                                 f"disagree on {differ}: {[a.get(k) for k in differ]} vs {[b.get(k) for k in differ]}")
    return result


def _convert(workflow: dict, node_info: dict) -> dict[str, tuple[dict, _NodeInputs]]:
    """{node id: (UI node, its converted inputs)} for the nodes sent to the server."""
    links = {link[0]: link for link in workflow.get("links", [])}
    converted = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):  # notes, muted, bypassed
            continue
        if kind not in node_info:
            raise ValueError(f"node {node['id']}: unknown node type {kind!r}")
        inputs = node_inputs(node, node_info[kind])
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _link_id, origin, origin_slot, *_ = links[slot["link"]]
                inputs.values[slot["name"]] = [str(origin), origin_slot]
        required = [name for name, spec, category in _ordered_inputs(node_info[kind]) if category == "required"]
        for name in required:
            if name not in inputs.values:
                raise ValueError(f"node {node['id']} ({kind}): required input {name!r} is not connected")
        converted[str(node["id"])] = (node, inputs)
    return converted


def to_api(workflow: dict, node_info: dict) -> dict:
    """A UI-format workflow as an API-format prompt ({id: {class_type, inputs}}).

    Raises ValueError when a node is unknown, widget values do not line up with the widget
    inputs (or widgets_values_named disagrees with widgets_values), or a required input is
    neither linked nor a widget.
    """
    return {node_id: {"class_type": node["type"], "inputs": inputs.values,
                      "_meta": {"title": node.get("title", node["type"])}}
            for node_id, (node, inputs) in _convert(workflow, node_info).items()}


def _check_value(name: str, spec, value, files) -> str | None:
    """Why `value` is not accepted by the widget input `spec` (None if it is)."""
    options, kind = _options(spec), widget_kind(spec)
    choices = combo_options(spec, files)
    if choices is not None:
        return None if value in choices else f"{name}: {value!r} is not one of {choices[:12]}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}: {value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}: {value!r} is not a string"
    if kind == "VIDEO_EDIT":
        return None if isinstance(value, dict) else f"{name}: {value!r} is not a video edit (a dict)"
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{name}: {value!r} is not an integer"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        return f"{name}: {value!r} is not a number"
    if kind in ("INT", "FLOAT") and ("min" in options and value < options["min"]
                                     or "max" in options and value > options["max"]):
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
    try:
        converted = _convert(workflow, node_info)
    except ValueError as err:
        return [str(err)]
    problems = []
    for node_id, (node, inputs) in converted.items():
        for key, value in inputs.values.items():
            spec = inputs.specs.get(key)
            if spec is None or isinstance(value, list) and is_link(value):
                continue
            problem = _check_value(key, spec, value, files)
            if problem:
                problems.append(f"node {node_id} ({node['type']}): {problem}")
        for key, control in inputs.controls.items():
            if control not in _CONTROL_VALUES:
                problems.append(f"node {node_id}: control value {control!r} after {key!r} "
                                f"is not one of {_CONTROL_VALUES}")
    nodes = {node["id"]: node for node in workflow["nodes"]}
    specs = {int(node_id): inputs.specs for node_id, (_node, inputs) in converted.items()}
    return problems + _link_problems(workflow, node_info, nodes, specs)


def is_link(value) -> bool:
    """Whether a prompt input value is a link ([origin id, origin slot])."""
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _link_problems(workflow: dict, node_info: dict, nodes: dict, specs: dict) -> list[str]:
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
        sink_specs = specs.get(target) or {name: spec for name, spec, _ in _ordered_inputs(node_info[sink["type"]])}
        accepted = sink_specs.get(slot["name"], [None])[0]
        if slot["name"] not in sink_specs or not _types_match(kind, accepted):
            problems.append(f"link {link_id}: {kind} into {sink['type']}.{slot['name']} ({accepted})")
    return problems
