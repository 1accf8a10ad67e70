"""``tcplug plugins``: plugins, their versions, commands and components per kind."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    from tcplug.plugins import plugin_commands, plugin_infos
    from tcplug.registry import get_registry

    parser = argparse.ArgumentParser(prog="tcplug plugins", description="List plugins and their components.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(list(argv))
    registry = get_registry()
    infos = plugin_infos()
    commands = plugin_commands()
    if args.json:
        payload = {
            "plugins": [{"name": i.name, "version": i.version, "status": i.status, "error": i.error} for i in infos],
            "components": registry.as_dict(),
        }
        if commands:
            payload["commands"] = {name: c.plugin for name, c in commands.items()}
        print(json.dumps(payload, indent=2))
        return 0
    print("plugins:")
    for i in infos:
        extra = f"  ({i.error})" if i.error else ""
        print(f"  {i.name:<28} {i.version or '-':<10} {i.status}{extra}")
    if commands:
        print("commands:")
        for name, c in commands.items():
            print(f"  {name:<14} {c.help}  ({c.plugin})")
    print("components:")
    for kind, comps in registry.as_dict().items():
        names = ", ".join(comps) or "-"
        print(f"  {kind:<14} {names}")
    return 0
