"""The repository explains itself: its documents exist, match the code, and point nowhere else."""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from egpu.cli import cli

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "egpu"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
THREAT_MODEL = ROOT / "docs" / "THREAT_MODEL.md"
README = ROOT / "README.md"
# Built from parts so this file does not match itself.
OUTSIDE_REFERENCES = ("shared" + "/", *(f"{n}.md" for n in ("DESIGN", "REFERENCE", "STYLE")))
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                ".hypothesis", "build", "dist"}
PROJECT = "scottjg/qemu-vfio-apple"
PROJECT_NAMED = re.compile(re.escape(PROJECT) + r"(?![\w-])")  # not the -images repository
TEST_REF = re.compile(r"`tests/(test_\w+\.py)::(\w+)`")
SRC_REF = re.compile(r"`(src/egpu/[\w/]+\.(?:py|sh))`")
ENV_IN_PYTHON = re.compile(
    r"""_ENV\s*=\s*"([A-Z][A-Z0-9_]*)"|envvar="([A-Z][A-Z0-9_]*)"|"""
    r"""env(?:iron)?(?:\.get\(|\[)"([A-Z][A-Z0-9_]*)"[\])]"""
)
ENV_IN_SHELL = re.compile(r"\$\{?(EGPU_[A-Z0-9_]+)")
WRAPPERS = ("egpu", "run-tests")
GPL2_HEADING = ("GNU GENERAL PUBLIC LICENSE", "Version 2, June 1991")
MAX_SUMMARY_LINES = 3


def _repo_files() -> list[Path]:
    """Every file of the checkout (tracked or new, not ignored), or a walk without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
            capture_output=True, check=True, text=True,
        ).stdout
        return [ROOT / name for name in out.split("\0") if name and (ROOT / name).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in ROOT.rglob("*")
                if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)]


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py")
                  if p.name not in ("__init__.py", "__main__.py") and "__pycache__" not in p.parts)


def _packages() -> list[Path]:
    return sorted(p for p in SRC.rglob("__init__.py") if "__pycache__" not in p.parts)


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        path = (*prefix, name)
        yield path
        if isinstance(command, click.Group):
            yield from _commands(command, path)


def test_no_file_refers_to_documents_outside_the_repository() -> None:
    offenders = []
    for path in _repo_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(ref in line for ref in OUTSIDE_REFERENCES):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_documents_exist_and_link_each_other() -> None:
    for doc in (ARCHITECTURE, THREAT_MODEL, ROOT / "CONTRIBUTING.md", README):
        assert doc.is_file(), doc
    readme = README.read_text()
    for target in ("docs/ARCHITECTURE.md", "docs/THREAT_MODEL.md", "CONTRIBUTING.md", "LICENSE"):
        assert f"({target})" in readme, f"README does not link {target}"


def test_license_is_the_gpl_2_text_the_package_declares() -> None:
    text = (ROOT / "LICENSE").read_text()
    head = [line.strip() for line in text.splitlines()[:3]]
    assert head[0] == GPL2_HEADING[0] and head[1] == GPL2_HEADING[1]
    assert "any later version" in text  # the "or later" the project chose is the GPL's own
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "GPL-2.0-or-later"}


def test_architecture_names_every_package_and_module() -> None:
    text = ARCHITECTURE.read_text()
    missing = [str(p.relative_to(SRC)) for p in _modules() if str(p.relative_to(SRC)) not in text]
    missing += [f"src/egpu/{p.parent.relative_to(SRC)}/" for p in _packages()
                if p.parent != SRC and f"src/egpu/{p.parent.relative_to(SRC)}/" not in text]
    assert not missing, f"docs/ARCHITECTURE.md does not mention: {', '.join(missing)}"


@pytest.mark.parametrize("package", _packages(), ids=lambda p: p.parent.name)
def test_package_docstring_summarises_its_layer_and_points_to_the_map(package: Path) -> None:
    doc = ast.get_docstring(ast.parse(package.read_text()))
    assert doc, f"{package.relative_to(ROOT)} has no docstring"
    summary = doc.split("\n\n", 1)[0].splitlines()
    assert len(summary) <= MAX_SUMMARY_LINES, summary
    assert "docs/ARCHITECTURE.md" in " ".join(summary), summary
    assert not summary[0].lower().startswith("see "), summary


def test_threat_model_names_only_tests_and_files_that_exist() -> None:
    text = THREAT_MODEL.read_text()
    tests = TEST_REF.findall(text)
    assert tests, "the threat model names no tests"
    missing = []
    for file_name, function in sorted(set(tests)):
        path = ROOT / "tests" / file_name
        if not path.is_file() or not re.search(rf"^def {function}\(", path.read_text(), re.M):
            missing.append(f"tests/{file_name}::{function}")
    missing += [ref for ref in sorted(set(SRC_REF.findall(text))) if not (ROOT / ref).is_file()]
    assert not missing, f"docs/THREAT_MODEL.md names what does not exist: {', '.join(missing)}"


def test_readme_documents_every_environment_variable_egpu_reads() -> None:
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        for match in ENV_IN_PYTHON.finditer(path.read_text()):
            names.update(g for g in match.groups() if g)
    for wrapper in WRAPPERS:
        names.update(ENV_IN_SHELL.findall((ROOT / wrapper).read_text()))
    assert {"EGPU_HOME", "EGPU_CACHE", "EGPU_DEBIAN_MIRROR"} <= names  # the scan works
    readme = README.read_text()
    missing = sorted(n for n in names if f"`{n}`" not in readme)
    assert not missing, f"README does not document: {', '.join(missing)}"


def test_no_string_in_the_code_says_the_reference() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and "the reference" in node.value.lower():
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "say 'scottjg/qemu-vfio-apple' (or 'the image reference'): " + \
        ", ".join(offenders)


def test_engine_means_only_the_qemu_build() -> None:
    """The GPU path is ``--gpu``: neither the docs nor a help text offer ``--engine``."""
    runner = CliRunner()
    for command in _commands(cli):
        result = runner.invoke(cli, [*command, "--help"])
        assert "--engine" not in result.output, (command, result.output)
    docs = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "CONTRIBUTING.md",
            ROOT / "bench" / "README.md"]
    offenders = [str(p.relative_to(ROOT)) for p in docs if "--engine" in p.read_text()]
    assert not offenders, "the GPU path's option is --gpu: " + ", ".join(offenders)


def test_help_texts_name_the_project_not_the_reference() -> None:
    runner = CliRunner()
    for command in _commands(cli):
        result = runner.invoke(cli, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "the reference" not in result.output.lower(), (command, result.output)
    pull_help = runner.invoke(cli, ["pull", "--help"]).output
    assert PROJECT_NAMED.search(pull_help), pull_help
