"""Installs that reproduce: constraints.txt pins every dependency pyproject.toml declares, within its
ranges, and both CI and the README's setup commands install with it."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def pins() -> dict[str, str]:
    """{canonical name: version} of constraints.txt's `name==version` lines."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not of the form name==version"
            found[canonicalize_name(name)] = version
    return found


def declared() -> list[Requirement]:
    """The dependencies of pyproject.toml, the optional ones included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = [req for group in project["optional-dependencies"].values() for req in group]
    return [Requirement(req) for req in project["dependencies"] + extras]


def test_every_declared_dependency_is_pinned_within_its_range():
    pinned = pins()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pinned[name]}, outside pyproject.toml's {requirement}")


def test_ci_and_the_readme_setup_install_with_the_constraints():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"pip install .*-c constraints\.txt -e \"\.\[test,train\]\"", ci)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup_lines = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    constrained = [line for line in setup_lines if "-c constraints.txt" in line]
    assert len(constrained) >= 2, "README commands 1 and 2 install with -c constraints.txt"
    # The one unconstrained command is the documented run against the newest releases. An eager
    # upgrade also upgrades torch (a dependency of diffusers, peft and accelerate) unless the same
    # install names it: without that, it swaps the machine's CPU build for a multi-GB CUDA one.
    for line in setup_lines:
        if line not in constrained:
            upgrade = next(step for step in line.split("&&") if "--upgrade" in step)
            assert re.search(r"\btorch==", upgrade), f"the upgrade must keep torch: {upgrade.strip()}"
