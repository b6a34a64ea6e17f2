"""The house's layout, checked: the import contracts hold (import-linter), no package
reaches into JAX's private modules, every package says what it owns and what it may import,
and the README's map of the tree names every package and nothing that is gone."""

import ast
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).parents[1]
PACKAGE = REPO / "jaxlm"
PACKAGES = sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))


def test_import_contracts_hold():
    linter = pytest.importorskip("importlinter")
    del linter
    result = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command;"
                             " lint_imports_command()"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout and "BROKEN" not in result.stdout


def imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_no_private_jax_imports():
    offenders = {str(p.relative_to(REPO)): name for p in PACKAGE.rglob("*.py")
                 for name in imports(p) if name.startswith("jax._src")}
    assert not offenders, offenders


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_every_package_states_what_it_owns_and_may_import(package):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    assert "Owns" in doc and "May import" in doc, package
    modules = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}
    modules |= {p.name for p in package.iterdir() if (p / "__init__.py").exists()}
    missing = [m for m in sorted(modules) if not re.search(rf"\b{m}\b", doc)]
    assert not missing, f"{package.name}/__init__.py does not describe {missing}"


def test_readme_map_matches_the_tree():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## What is inside", 1)[1].split("\n## ", 1)[0]
    for package in PACKAGES:
        assert f"jaxlm/{package.name}/" in section, f"README does not place jaxlm/{package.name}/"
    for path in re.findall(r"`(jaxlm/[\w/.]+)`", section):
        assert (REPO / path).exists(), f"README names {path}, which does not exist"


def test_readme_exit_codes_are_the_table_the_commands_exit_by():
    from jaxlm import errors
    readme = (REPO / "README.md").read_text()
    table = readme.split("**Exit codes**", 1)[1].split("\n\n", 2)[1]
    rows = dict(re.findall(r"^\| (\d+)(?: \(\w+\))? \| (.+) \|$", table, re.M))
    for code, (_, meaning) in errors.EXIT_CODES.items():
        assert meaning in rows.get(str(code), ""), (code, meaning)
