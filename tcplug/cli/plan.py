"""``tcplug plan``: the memory a recipe's training step needs, estimated on the meta device."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tcplug plan",
        description="estimate a recipe's training memory (weights, gradients, optimizer state, activations, "
                    "K/V buffer) without allocating the model; say whether it fits and which lever to pull")
    parser.add_argument("--config", action="append", required=True, metavar="RECIPE",
                        help="a recipe file (repeat to overlay, as with tcplug fit)")
    parser.add_argument("--gpu-memory", metavar="SIZE", help="the card's memory, e.g. 24GB or 80GB: says whether it fits")
    parser.add_argument("--device", choices=["gpu", "cpu"], default=None,
                        help="where the step runs (default: the recipe's trainer.accelerator; cpu counts this "
                             "process's own memory as the runtime)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(list(argv))
    from tcplug.plan import parse_bytes, plan, report
    from tcplug.recipe import load

    cfg = load(args.config)
    device = args.device or ("cpu" if str((cfg.get("trainer") or {}).get("accelerator", "gpu")) == "cpu" else "gpu")
    result = plan(cfg, parse_bytes(args.gpu_memory) if args.gpu_memory else None, device=device)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0
