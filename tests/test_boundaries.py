"""The engine stands alone: no ComfyUI, no node pack, no trainer, no heavy diffusers import, no print, no unsafe load,
only relative imports of itself, no import cycles.

Checked twice: statically (every import statement of every dmp_model module, by AST) and dynamically
(importing every module in a fresh interpreter and looking at sys.modules).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dmp_model"
SOURCES = sorted(PACKAGE.rglob("*.py"))
# ComfyUI's modules, and this repository's own layers above the engine.
FORBIDDEN = ("comfy", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes", "execution",
             "training")


def imported_modules(tree: ast.AST) -> list[tuple[str, int]]:
    """Absolute module names imported anywhere in a file (function-level imports included), with lines."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.append((str(node.args[0].value), node.lineno))
    return found


def parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_sources_are_found():
    names = {p.name for p in SOURCES}
    assert {"__init__.py", "model.py", "loading.py", "main.py", "text.py"} <= names


def source_id(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


@pytest.mark.parametrize("path", SOURCES, ids=source_id)
def test_no_forbidden_imports_in_the_source(path):
    found = imported_modules(parse(path))
    bad = [(name, line) for name, line in found if name.split(".")[0] in FORBIDDEN]
    assert bad == [], f"{path.name} imports {bad}"
    absolute = [(name, line) for name, line in found if name.split(".")[0] == "dmp_model"]
    assert absolute == [], \
        f"{path.name} imports dmp_model absolutely {absolute}: it breaks when ComfyUI loads the pack by path"


# The model libraries live behind one layer: dmp_model/sd (the trainer, outside dmp_model, uses them too).
MODEL_LIBRARIES = ("diffusers", "peft", "transformers")


@pytest.mark.parametrize("path", SOURCES, ids=source_id)
def test_only_the_sd_layer_imports_the_model_libraries(path):
    libraries = [(name, line) for name, line in imported_modules(parse(path))
                 if name.split(".")[0] in MODEL_LIBRARIES]
    if path.relative_to(PACKAGE).parts[0] != "sd":
        assert libraries == [], f"{source_id(path)} imports {libraries}: model libraries belong in dmp_model/sd"


def test_the_ast_check_does_catch_forbidden_imports():
    code = ("import os\ndef f():\n    import comfy.utils\n    from nodes import X\n"
            "    importlib.import_module('training.cli')\n")
    names = [name.split(".")[0] for name, _ in imported_modules(ast.parse(code))]
    assert [n for n in names if n in FORBIDDEN] == ["comfy", "nodes", "training"]


def test_importing_every_module_pulls_in_nothing_forbidden_and_no_diffusers_pipelines():
    script = """
import importlib, json, pkgutil, sys
import dmp_model
after_package = sorted(sys.modules)
for info in pkgutil.walk_packages(dmp_model.__path__, "dmp_model."):
    if info.name != "dmp_model.__main__":  # runs the CLI
        importlib.import_module(info.name)
print(json.dumps({"after_package": after_package, "after_all": sorted(sys.modules)}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    for stage in ("after_package", "after_all"):
        bad = [m for m in modules[stage] if m.split(".")[0] in FORBIDDEN]
        assert bad == [], f"{stage}: {bad}"
        assert "diffusers.pipelines" not in modules[stage], stage
    # DMPModel (sd/) is imported when first asked for: the node pack imports the package without it.
    assert "dmp_model.sd.model" not in modules["after_package"] and "dmp_model.cli.main" in modules["after_all"]


def is_print(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"


def is_torch_load(node: ast.AST) -> bool:
    func = getattr(node, "func", None)
    return isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "load" and \
        isinstance(func.value, ast.Name) and func.value.id == "torch"


def weights_only_true(call: ast.Call) -> bool:
    return any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


@pytest.mark.parametrize("path", SOURCES, ids=source_id)
def test_no_print_and_no_unsafe_torch_load(path):
    tree = parse(path)
    prints = [n.lineno for n in ast.walk(tree) if is_print(n)]
    unsafe = [n.lineno for n in ast.walk(tree) if is_torch_load(n) and not weights_only_true(n)]
    assert prints == [], f"{path.name}: print() at lines {prints}; use logging"
    assert unsafe == [], f"{path.name}: torch.load without weights_only=True at lines {unsafe}"


def test_the_ast_checks_do_catch_print_and_unsafe_loads():
    tree = ast.parse("print('x')\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
                     "torch.load(p, weights_only=True)\n")
    assert sum(is_print(n) for n in ast.walk(tree)) == 1
    loads = [n for n in ast.walk(tree) if is_torch_load(n)]
    assert [weights_only_true(n) for n in loads] == [False, False, True]


def test_torch_load_is_used_somewhere_so_the_check_means_something():
    calls = [n for p in SOURCES for n in ast.walk(parse(p)) if is_torch_load(n)]
    assert calls and all(weights_only_true(n) for n in calls)


def module_name(path: Path, root: Path) -> str:
    """The dotted module name of a source file under `root` (a package's __init__.py is the package)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path, root: Path, known: set[str]) -> set[str]:
    """The modules of `known` that a file imports anywhere in it: relative or absolute, at module
    level, under TYPE_CHECKING or inside functions (``from . import x`` counts as importing ``x``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    candidates = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            full = ".".join(base + ([node.module] if node.module else []))
            # "from x import y" imports the module x.y where there is one, else a name of x
            candidates += [f"{full}.{a.name}" if f"{full}.{a.name}" in known else full for a in node.names]
        elif isinstance(node, ast.Import):
            candidates += [alias.name for alias in node.names]
    found = set()
    for candidate in candidates:
        parts = candidate.split(".")
        prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
        found |= {next(p for p in prefixes if p in known)} if any(p in known for p in prefixes) else set()
    return found - {name}


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: the modules of the same package it imports} for every source file of `package`."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    return {name: internal_imports(path, root, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ([a, b, ..., a]) of a module -> imported modules graph, or None (depth-first)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


@pytest.mark.parametrize("package", ["dmp_model", "training"])
def test_no_import_cycles_among_the_package_modules(package):
    graph = import_graph(ROOT, package)
    assert f"{package}.tasks.codecs" in graph[f"{package}.adapters"] if package == "dmp_model" else \
        f"{package}.config" in graph[f"{package}.trainer"]  # the graph sees the imports
    assert find_cycle(graph) is None, f"{package} modules import each other in a cycle: {find_cycle(graph)}"



def test_the_demo_sits_on_the_trainer_and_only_the_commands_reach_it():
    """training/demo/ uses the trainer, never the other way round: outside the demo only the command line
    (cli.py, __main__.py) imports it; the demo's prior shares the objective module with the trainer."""
    graph = import_graph(ROOT, "training")
    commands = {"training.cli", "training.__main__"}
    upward = sorted((module, target) for module, targets in graph.items()
                    if module.split(".")[:2] != ["training", "demo"] and module not in commands
                    for target in targets if target.split(".")[:2] == ["training", "demo"])
    assert upward == [], f"imports of the demo from below it: {upward}"
    assert "training.demo" in graph["training.cli"]  # the graph sees the imports
    assert "training.objective" in graph["training.demo.prior"] and "training.objective" in graph["training.trainer"]
    assert "training.trainer" not in graph["training.demo.prior"]

# The engine's layers, lowest first (a folder or a top-level module each): a module imports its own layer
# and the layers below it only. The package's public API (dmp_model/__init__.py, __main__.py) sits on top.
LAYERS = ("options", "io", "images", "sampling", "tasks", "adapters", "prediction", "geometry", "sd", "cli")


def layer_of(module: str) -> str | None:
    """'dmp_model.sd.model' -> 'sd'; None for the package itself and its __main__."""
    parts = module.split(".")
    return None if len(parts) == 1 or parts[1] == "__main__" else parts[1]


def test_the_engine_layers_import_only_downward():
    graph = import_graph(ROOT, "dmp_model")
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    unplaced = sorted({layer_of(m) for m in graph} - set(LAYERS) - {None})
    assert unplaced == [], f"dmp_model/{unplaced}: place each new folder or module in LAYERS"
    upward = [(module, target) for module, targets in graph.items() if layer_of(module) for target in targets
              if layer_of(target) is None or rank[layer_of(target)] > rank[layer_of(module)]]
    assert upward == [], f"imports that go up a layer: {upward}"
    assert "dmp_model.tasks.codecs" in graph["dmp_model.prediction.predict"]  # the graph sees the imports


def test_the_cycle_check_does_catch_cycles(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import X\n")
    (package / "b.py").write_text("def f():\n    from .sub import c\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "c.py").write_text("import os\nfrom pkg.a import Y\nfrom .. import b\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": set(),
                     "pkg.sub.c": {"pkg.a", "pkg.b"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def import_closure(graph: dict[str, set[str]], starts: set[str]) -> set[str]:
    """Every module that importing `starts` runs: what they import, and the packages above each (their
    __init__.py runs first), transitively."""
    seen: set[str] = set()
    todo = list(starts)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:n]) for n in range(1, len(parts))] + sorted(graph.get(module, ()))
    return seen


def test_the_nodes_never_reach_the_model_libraries_layer():
    """The node pack runs on ComfyUI's own models: neither it nor any engine module it imports (package
    __init__ files included) imports dmp_model.sd or a model library (diffusers, peft, transformers)."""
    files = {module_name(p, ROOT): p for package in ("nodes", "dmp_model")
             for p in sorted((ROOT / package).rglob("*.py"))}
    graph = {name: internal_imports(path, ROOT, set(files)) for name, path in files.items()}
    # dmp_model/__init__.py imports DMPModel (sd/) only when that attribute is asked for (its __getattr__);
    # the node pack never asks (the next test imports it and looks).
    assert "dmp_model.sd.model" in graph["dmp_model"]
    graph["dmp_model"] = graph["dmp_model"] - {"dmp_model.sd.model"}
    closure = import_closure(graph, {m for m in files if m.split(".")[0] == "nodes"})
    assert "dmp_model.sampling" in closure and "dmp_model.adapters" in closure  # the closure sees the imports
    reached = sorted(m for m in closure if m.split(".")[:2] in (["dmp_model", "sd"], ["dmp_model", "cli"]))
    assert reached == [], f"the node pack imports {reached}"
    libraries = sorted((module, name) for module in closure for name, _ in imported_modules(parse(files[module]))
                       if name.split(".")[0] in MODEL_LIBRARIES)
    assert libraries == [], f"modules the node pack imports use model libraries: {libraries}"


def test_the_import_closure_includes_packages_and_what_they_import():
    graph = {"a.b.c": {"d"}, "a": {"e.f"}, "e.f": set(), "d": set()}
    assert import_closure(graph, {"a.b.c"}) == {"a.b.c", "a.b", "a", "d", "e", "e.f"}


def test_importing_the_node_pack_loads_no_model_library():
    script = """
import importlib, json, pkgutil, sys, types
root = sys.argv[1]
package = types.ModuleType("pack_root")  # the repository as a package, as ComfyUI loads it by path
package.__path__ = [root]
sys.modules["pack_root"] = package
nodes = importlib.import_module("pack_root.nodes")
for info in pkgutil.walk_packages(nodes.__path__, "pack_root.nodes."):
    importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert "pack_root.nodes.native" in modules and "pack_root.dmp_model.sampling" in modules
    heavy = [m for m in modules if m.split(".")[0] in MODEL_LIBRARIES or m.startswith("pack_root.dmp_model.sd")]
    assert heavy == []
