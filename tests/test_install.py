"""The install the quickstart runs brings what training needs and nothing more: no torch
(3 GB of CUDA libraries from the registry), no libtpu. Read from the package metadata, the
way pip resolves it: the core requirements and, transitively, theirs."""

import importlib.metadata as metadata
import re

import pytest

packaging_requirements = pytest.importorskip("packaging.requirements")

HEAVY = ("torch", "libtpu", "transformers", "tensorflow")  # tensorflow-datasets is not tensorflow


def requirements(dist: str, extras: tuple[str, ...] = ()) -> list:
    """`dist`'s requirements that apply on this machine with `extras`."""
    found = []
    for text in metadata.requires(dist) or []:
        req = packaging_requirements.Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or ("",)):
            found.append(req)
    return found


def name(req) -> str:
    return re.sub(r"[-_.]+", "-", req.name).lower()


def closure(dist: str, extras: tuple[str, ...] = ()) -> set[str]:
    """Every distribution `pip install dist[extras]` brings, as far as installed here."""
    seen: set[str] = set()
    visited: set[tuple[str, frozenset]] = set()
    todo = [(dist, extras)]
    while todo:
        current, current_extras = todo.pop()
        for req in requirements(current, current_extras):
            seen.add(name(req))
            key = (name(req), frozenset(req.extras))
            if key in visited:
                continue
            visited.add(key)
            try:
                metadata.distribution(req.name)
            except metadata.PackageNotFoundError:
                continue  # required elsewhere (another platform's wheel); nothing to follow
            todo.append((req.name, tuple(req.extras)))
    return seen


def test_the_core_install_brings_no_torch_and_no_libtpu():
    core = closure("jaxlm")
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain",
            "tensorflow-datasets"} <= core
    assert not {n for n in core if n in HEAVY or n.startswith("nvidia-")}, sorted(core)


def test_libtpu_comes_only_with_the_tpu_extra():
    assert "libtpu" not in closure("jaxlm", ("test",))
    assert "libtpu" in closure("jaxlm", ("tpu",))
