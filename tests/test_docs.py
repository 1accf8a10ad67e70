"""Every Python code block in docs/ runs (mktestdocs); the docs site builds strictly."""

import subprocess
import sys
from pathlib import Path

import pytest
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
