"""House rules: the engine never imports a plugin package; plugins use only the public API."""

import ast
from pathlib import Path

import tcplug

ROOT = Path(__file__).resolve().parents[1]


def imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]


def test_engine_never_imports_plugins():
    for path in (ROOT / "tcplug").rglob("*.py"):
        for module, _ in imports(path):
            assert not module.startswith("tcplug_"), f"{path} imports {module}"
        assert "tcplug_" not in "".join(
            line for line in path.read_text().splitlines() if "import" in line and "tcplug_" in line
        ), f"{path} names a plugin package in an import"


def test_plugins_use_only_public_api():
    public = set(tcplug.__all__)
    plugin_dirs = list((ROOT / "plugins").glob("tcplug_*")) + list((ROOT / "examples").glob("*/tcplug_*"))
    assert plugin_dirs
    for d in plugin_dirs:
        for path in d.rglob("*.py"):
            for module, names in imports(path):
                if module == "tcplug":
                    assert names and set(names) <= public, f"{path}: {names} not in tcplug.__all__"
                else:
                    assert not module.startswith("tcplug."), f"{path} reaches into {module}"


def test_import_tcplug_has_no_side_effects():
    import subprocess
    import sys

    code = "import tcplug, tcplug.plugins as p, sys; print(p._loaded, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    assert out == ["False", "False"]
