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


# ----- the house map (docs/design.md) ----------------------------------------------------------
ENGINE = ROOT / "tcplug"
#: names of dependencies' private details; only tcplug/compat.py may name them
PRIVATE_NAMES = ("_typehints", "_from_config", "_parse_ckpt_path", "._parser(", "_subcommand_parsers",
                 "_subcommands_action", "_ddp_kwargs", "_on_before_step", "_on_after_step", "_get_file_writer")


def rooms_table() -> dict[str, set[str]]:
    """room -> the rooms it may import, read from the table in docs/design.md."""
    import re

    text = (ROOT / "docs" / "design.md").read_text()
    table = text.split("<!-- house:start -->")[1].split("<!-- house:end -->")[0]
    allowed: dict[str, set[str]] = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rooms = re.findall(r"`([\w]+)`", cells[0])
        may = {"*"} if "every room" in cells[2] else set(re.findall(r"`([\w]+)`", cells[2]))
        for room in rooms:
            allowed[room] = may
    return allowed


def room_of(path: Path) -> str:
    rel = path.relative_to(ENGINE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def engine_imports(path: Path) -> set[str]:
    """The tcplug rooms a file imports at run time (function-level imports too; not the
    annotation-only imports under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"tcplug.{a.name}" for a in node.names] if node.module == "tcplug" else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "tcplug" and len(parts) > 1 and ((ENGINE / f"{parts[1]}.py").exists()
                                                           or (ENGINE / parts[1]).is_dir()):
                found.add(parts[1])
    return found


def test_every_room_imports_only_what_the_house_map_allows():
    allowed = rooms_table()
    graph: dict[str, set[str]] = {}
    for path in ENGINE.rglob("*.py"):
        room = room_of(path)
        assert room in allowed, f"{path}: room {room!r} is not on the house map in docs/design.md"
        for target in engine_imports(path) - {room}:
            assert "*" in allowed[room] or target in allowed[room], \
                f"{path.relative_to(ROOT)} imports tcplug.{target}, which room {room!r} may not (docs/design.md)"
            graph.setdefault(room, set()).add(target)
    # no import circle between rooms (the dispatcher and the public API sit on top)
    done, stack = set(), []

    def visit(room):
        if room in stack:
            raise AssertionError(f"import circle: {' -> '.join(stack[stack.index(room):] + [room])}")
        if room in done:
            return
        stack.append(room)
        for target in graph.get(room, ()):
            visit(target)
        stack.pop()
        done.add(room)

    for room in graph:
        visit(room)


def test_rooms_stay_livable():
    for path in ENGINE.rglob("*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= 450, f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno < 370, f"{path.relative_to(ROOT)}: class {node.name}"


def test_private_details_of_dependencies_only_in_compat():
    for path in ENGINE.rglob("*.py"):
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] not in ("tcplug",
                                                                                                    "__future__"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if not name.startswith("tcplug") and name != "__future__":
                    assert not any(p.startswith("_") for p in name.split(".")), \
                        f"{path.relative_to(ROOT)} imports a private module or name of a dependency: {name}"
        text = path.read_text()
        for name in PRIVATE_NAMES:
            assert name not in text, f"{path.relative_to(ROOT)} names {name!r}: keep it in tcplug/compat.py"


HEAVY = ("diffusers", "transformers", "peft")


def _loaded(*args) -> tuple[set[str], str]:
    """The heavy modules a `tcplug ARGS` process imported, and its import-time tree."""
    import subprocess
    import sys

    code = ("import sys, atexit\nfrom tcplug.cli import main\n"
            "atexit.register(lambda: print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{HEAVY + ('torch', 'lightning', 'torchmetrics')!r} and '.' not in m), file=sys.stderr))\n"
            f"sys.exit(main({list(args)!r}))\n")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, cwd=ROOT)
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("LOADED"))
    return set(eval(line.split(" ", 1)[1])), proc.stderr


def _importers(tree: str, module: str) -> list[str]:
    """The modules whose import first imported ``module``, innermost first (``-X importtime``
    prints a module after its children, indented by depth)."""
    lines = [ln.split("|")[-1] for ln in tree.splitlines() if ln.startswith("import time:") and "|" in ln][1:]
    for i, ln in enumerate(lines):
        if ln.strip() == module:
            chain, depth = [], len(ln) - len(ln.lstrip())
            for parent in lines[i + 1:]:
                d = len(parent) - len(parent.lstrip())
                if d < depth:
                    chain.append(parent.strip())
                    depth = d
            return chain
    return []


def test_light_commands_import_no_heavy_dependency():
    """`import tcplug`, `tcplug --help` and a recipe-file error import none of diffusers,
    transformers, peft (nor Lightning); `tcplug plugins` imports neither diffusers nor peft, and
    transformers only under torchmetrics (which imports it)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import tcplug, sys; print(sorted(m for m in sys.modules "
                          "if m.split('.')[0] in ('torch', 'lightning', 'diffusers', 'transformers', 'peft')))"],
                         capture_output=True, text=True).stdout.strip()
    assert out == "[]"
    help_loaded, _ = _loaded("--help")
    assert not help_loaded & set(HEAVY) and "lightning" not in help_loaded, help_loaded
    recipe_loaded, _ = _loaded("fit", "--config", "recipes/nope.yaml")
    assert not recipe_loaded & {*HEAVY, "torch", "lightning"}, recipe_loaded
    for args in (("plugins",),):  # (a LightningCLI parse error imports what Lightning imports: benchmarks/startup.py)
        loaded, tree = _loaded(*args)
        assert not loaded & {"diffusers", "peft"}, (args, loaded)
        if "transformers" in loaded:
            chain = _importers(tree, "transformers")
            assert any(m.split(".")[0] == "torchmetrics" for m in chain), (args, chain)


def test_public_api_names_all_resolve():
    eager = {"RegistryError", "TcplugError", "UnknownComponentError", "__version__", "hookimpl"}
    assert set(tcplug.__all__) == set(tcplug._LAZY) | eager
    for name in tcplug.__all__:
        assert getattr(tcplug, name) is not None, name
