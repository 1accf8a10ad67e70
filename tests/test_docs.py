"""Every Python code block in docs/ runs (mktestdocs); the docs site builds strictly."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from mktestdocs import check_md_file

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_python_blocks_run(page):
    check_md_file(fpath=page, memory=True)


def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=DOCS.parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


FENCE = re.compile(r"(?:<!--\s*(not-run|run):\s*(.*?)\s*-->\s*\n)?^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_every_code_block_runs_or_says_why_not(page):
    """Python blocks run (above); YAML and TOML blocks must parse; `text` blocks are output
    listings; every other block (shell commands) says where it runs (`<!-- run: tests/... -->`)
    or why it does not (`<!-- not-run: reason -->`)."""
    for marker, reason, lang, body in FENCE.findall(page.read_text()):
        where = f"{page.relative_to(DOCS)}: {lang or 'unlabelled'} block {body[:60]!r}"
        if lang == "python" or lang == "text":
            continue
        if lang == "yaml":
            yaml.safe_load(body)
        elif lang == "toml":
            tomllib.loads(body)
        else:
            assert marker and reason.strip(), f"{where} needs <!-- not-run: reason --> or <!-- run: tests/... -->"
        if marker == "run":
            test_file = reason.split("::")[0].split()[0]
            assert (DOCS.parent / test_file).is_file(), f"{where}: {test_file} does not exist"


def test_plugin_tutorial_is_the_example_package():
    """Following the plugin tutorial literally gives examples/tcplug-token-shift, which the
    test suite pip-installs and trains with (tests/test_third_party.py)."""
    text = (DOCS / "tutorials" / "write-a-plugin.md").read_text()
    blocks = {}
    for _, _, lang, body in FENCE.findall(text):  # the first block of each language is the package's
        if lang in ("toml", "python"):
            blocks.setdefault(lang, body)
    pkg = DOCS.parent / "examples" / "tcplug-token-shift"
    pyproject = (pkg / "pyproject.toml").read_text()
    for line in blocks["toml"].strip().splitlines():
        assert line in pyproject, f"pyproject.toml of the example lacks {line!r}"
    code = blocks["python"].split("# check it before publishing")[0].strip()
    code = code.removeprefix("# tcplug_token_shift/__init__.py").strip()
    source = (pkg / "tcplug_token_shift" / "__init__.py").read_text()
    squash = lambda s: re.sub(r"\s+", " ", s)  # noqa: E731
    for chunk in code.split("\n\n\n"):
        assert squash(chunk.strip()) in squash(source), f"the example package differs from the tutorial at:\n{chunk}"


def test_every_declared_capability_is_documented():
    """docs/concepts/plugins.md lists every attribute and method a kind declares."""
    from tcplug.kinds import Component
    from tcplug.registry import KINDS

    text = (DOCS / "concepts" / "plugins.md").read_text().split("## What the engine asks of a component")[1]
    text = text.split("\n## ")[0]
    skip = {"training", "dump_patches", "call_super_init", "full_state_update"}
    for base in [Component, *KINDS.values()]:
        for name in vars(base):
            if not name.startswith("_") and name not in skip:
                assert f"`{name}" in text, f"{base.__name__}.{name} is not in docs/concepts/plugins.md"
