"""The suite reads as one (issue 24 §6): checks that fail when a test module drifts from the shared helpers."""

import ast
import re

from conftest import ROOT

TESTS = ROOT / "tests"


def test_no_test_module_imports_another_test_module():
    """A fixture imported from another test module is a second fixture: its reference run was trained twice.
    Shared helpers and fixtures live in conftest.py."""
    bad = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            bad += [f"{path.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert bad == []


def test_every_launch_is_built_by_conftest():
    """One command line for `accelerate launch` and launch/run.py: conftest.launch_cmd."""
    offenders = [str(p.relative_to(TESTS)) for p in sorted(TESTS.rglob("*.py")) if p.name not in ("conftest.py", "test_suite.py")
                 and ("accelerate.commands.launch" in p.read_text() or '"--multi_gpu"' in p.read_text())]
    assert offenders == []


def test_the_readme_test_command_is_the_one_ci_runs():
    """The README's second set-up command and .ci/run's default-suite line: the same pytest invocation."""
    readme = re.search(r"^pip install -e \"\.\[test\]\" && (python -m pytest[^\n]*)$", (ROOT / "README.md").read_text(),
                       re.M)
    ci = re.search(r"^\.venv/bin/(python -m pytest -q[^\n]*)$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert readme and ci and readme.group(1) == ci.group(1)


def test_every_local_link_and_image_in_the_docs_exists():
    """README.md and docs/*.md: each relative target of a Markdown link or image (``[..](path)``, ``![..](path)``)
    is a file or folder of the repository, so a renamed grid or moved page shows up here."""
    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path = target.split("#")[0]
            if path and "://" not in path and not (page.parent / path).exists():
                missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert missing == []
