"""Real Wan configurations on this machine: the Wan2.1-T2V-1.3B transformer at its published shape
(random weights) trains LoRA steps through `tcplug fit` (recipes/wan/cpu-1.3b.yaml), each
configuration in its own process, with its peak resident memory (the process's ``ru_maxrss``) and
step time, and its peak during steps 2..N (the model built, the first step's one-time casts
done); `tcplug plan` estimates the same configuration on the meta device, and the table says
how far the estimate is from the measured peak. The 14B configuration is planned only (meta).

Resumable: each measured configuration is kept in OUT/real_scale.json and not run again.

  python benchmarks/real_scale.py                 # the three 1.3B configurations + the 14B plan
  python benchmarks/real_scale.py --only ckpt-9x128
  python benchmarks/real_scale.py --smoke         # the tiny Wan recipe at the same code path
  python benchmarks/real_scale.py --levers        # loading into bf16, offload: disk (a saved 1.3B folder)

`--levers` saves the random 1.3B transformer as a diffusers folder (fp32, 5.7 GB, in a temporary
folder; once as one file, once in 1 GB shards) and measures, each in its own process, the peak RSS of
its load in fp32, in fp32 then cast to bf16, and straight in bf16 (`dtype: bfloat16`, diffusers'
`torch_dtype`), with the peak of its anonymous memory (RSS also counts the pages of the mapped
weight files, which the kernel may drop), and a sampling forward with the blocks resident
against `offload: disk` (peak RSS of the second forward, the first one's setup not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "wan" / "cpu-1.3b.yaml"
#: name -> overlay of recipes/wan/cpu-1.3b.yaml
CONFIGS = {
    "ckpt-9x128": {},
    "ckpt-17x256": {"data": {"frames": 17, "size": 256}},
    "nockpt-9x128": {"model": {"backbone": {"init_args": {"gradient_checkpointing": False}}}},
    "fp8-9x128": {"model": {"backbone": {"init_args": {"storage_dtype": "float8_e4m3fn"}}}},
}
SMOKE = {"model": {"backbone": {"init_args": {"config": {
    "patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16, "out_channels": 16,
    "text_dim": 32, "freq_dim": 64, "ffn_dim": 64, "num_layers": 2, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}}}, "lora": {"rank": 4}},
    "data": {"frames": 5, "size": 32}, "trainer": {"max_steps": 2}}
FIT = """
import json, resource, sys
from tcplug.cli import main
code = main(sys.argv[1:])
print("MAXRSS " + json.dumps({"code": code, "kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


LEVER = """
import json, resource, sys, time, torch
from tcplug_wan import WanBackbone
what, folder, scratch = sys.argv[1:4]
def status(key):
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(key + ":")) / 2**20
def hwm():
    return status("VmHWM")
import threading
anon = [0.0]
def watch():  # the peak of anonymous memory: RSS also counts the mapped weight files' pages, which the kernel can drop
    while True:
        anon[0] = max(anon[0], status("RssAnon"))
        time.sleep(0.002)
threading.Thread(target=watch, daemon=True).start()
if what.startswith("save"):  # save | save-sharded (1 GB files, as the published 14B folders are split)
    torch.manual_seed(0)
    WanBackbone(config="wan2.1-t2v-1.3b").model.save_pretrained(
        folder + "/transformer", **({"max_shard_size": "1GB"} if what == "save-sharded" else {}))
    row = {}
elif what.startswith("load"):  # load-fp32 | load-fp32-cast (loaded, then cast) | load-bf16 (dtype: bfloat16)
    t0 = time.perf_counter()
    net = WanBackbone(pretrained=folder, dtype="bfloat16" if what == "load-bf16" else None)
    if what == "load-fp32-cast":
        net.model.to(torch.bfloat16)
    row = {"peak_rss_gib": hwm(), "peak_anon_gib": anon[0], "load_s": time.perf_counter() - t0,
           "weights_gib": sum(p.numel() * p.element_size() for p in net.parameters()) / 2**30}
else:  # sample-resident | sample-disk: a no-grad forward at 9 frames 128^2 (3 x 16 x 16 latents, 192 tokens)
    kw = {"offload": "disk", "offload_dir": scratch} if what == "sample-disk" else {}
    net = WanBackbone(pretrained=folder, **kw).eval()
    x, t, ctx = torch.randn(1, 3, 16, 16, 16), torch.tensor([500.0]), {"text": torch.zeros(1, 1, 4096)}
    with torch.no_grad():
        first = net(x, t, ctx)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        t0 = time.perf_counter()
        second = net(x, t, ctx)
    row = {"peak_rss_gib": hwm(), "forward_s": time.perf_counter() - t0, "out_sum": float(second.double().sum()),
           "same_as_first": bool(torch.equal(first, second))}
print("ROW " + json.dumps(row))
"""


def lever(what: str, folder: Path, scratch: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", LEVER, what, str(folder), str(scratch)], capture_output=True,
                          text=True, env=env())
    line = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
    if proc.returncode or not line:
        raise SystemExit(f"{what}: failed\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][4:])


def levers(results: dict, store: Path) -> None:
    for sharded in (False, True):
        tail = "-sharded" if sharded else ""
        names = [n + tail for n in ("load-fp32", "load-fp32-cast", "load-bf16")] + ([] if sharded else ["sample-resident", "sample-disk"])
        if all(f"lever:{n}" in results for n in names):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            folder, scratch = Path(tmp) / "wan-1.3b", Path(tmp) / "offload"
            lever("save" + tail, folder, scratch)
            for name in names:
                if f"lever:{name}" not in results:
                    results[f"lever:{name}"] = lever(name.removesuffix(tail), folder, scratch)
                    store.write_text(json.dumps(results, indent=2))


def overlay(settings: dict, work: Path, name: str) -> Path:
    import yaml

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


#: glibc's malloc keeps freed blocks below its (growing) mmap threshold mapped, so the resident set
#: of a CPU run overstates the live tensors by gigabytes at large token counts; with a fixed
#: threshold every large block is returned when freed (--mmap-threshold, the `+mmap` rows)
MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def env(extra: dict | None = None) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]),
                **(extra or {}))


def measure(name: str, settings: dict, work: Path, mmap: bool = False, alloc: bool = False) -> dict:
    extra = overlay(settings, work, name)
    steps = work / f"{name}.steps.json"
    cmd = [sys.executable, "-c", FIT, "fit", "--config", str(RECIPE), "--config", str(extra),
           "--trainer.enable_progress_bar=false", "--trainer.callbacks+=_timing.StepTimer",
           f"--trainer.callbacks.init_args.out={steps}", "--trainer.callbacks+=_timing.PeakRSS",
           f"--trainer.callbacks.init_args.out={work / (name + '.rss.json')}"]
    if alloc:  # profiles step 2, which then is not timed: the median is of steps 3..N
        cmd += ["--trainer.callbacks+=_timing.PeakAlloc", f"--trainer.callbacks.init_args.out={work / (name + '.alloc.json')}"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env(MMAP if mmap else None))
    line = [x for x in proc.stdout.splitlines() if x.startswith("MAXRSS ")]
    if proc.returncode or not line or json.loads(line[-1][7:])["code"]:
        raise SystemExit(f"{name}: fit failed\n{proc.stderr[-3000:]}")
    times = json.loads(steps.read_text())
    steady = json.loads((work / f"{name}.rss.json").read_text())["steady_kib"]
    row = {"peak_rss_gib": json.loads(line[-1][7:])["kib"] / 2**20, "steady_rss_gib": steady / 2**20,
           "step_s": statistics.median(times[2 if alloc else 1:] or times), "steps_s": times}
    if alloc:
        row["alloc"] = json.loads((work / f"{name}.alloc.json").read_text())
        row["alloc_peak_gib"] = row["alloc"]["above_start_gib"] + row["alloc"]["live_gib"]
    return row


def plan(recipes: list[Path], work: Path, in_process: bool = False) -> dict:
    import _inproc

    proc = _inproc.tcplug(["plan", *[a for r in recipes for a in ("--config", str(r))], "--json"], work, in_process,
                          env=env())
    if proc.returncode:
        raise SystemExit(f"plan failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="real_scale")
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--levers", action="store_true", help="measure the loading and offloading levers")
    parser.add_argument("--mmap-threshold", action="store_true",
                        help="run the fits with MALLOC_MMAP_THRESHOLD_=65536 (rows named NAME+mmap)")
    parser.add_argument("--alloc-peak", action="store_true",
                        help="also profile step 2 for torch's own allocation peak (rows named NAME+alloc)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "real_scale.json"
    results = json.loads(store.read_text()) if store.exists() and not args.smoke else {}
    if args.levers:
        levers(results, store)
        print(json.dumps({"bench": "real_scale", "results": results}))
        return
    configs = {"smoke": SMOKE} if args.smoke else {k: v for k, v in CONFIGS.items() if not args.only or k in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for base, settings in configs.items():
            name = base + ("+mmap" if args.mmap_threshold else "") + ("+alloc" if args.alloc_peak else "")
            if name in results:
                continue
            row = measure(name, settings, work, args.mmap_threshold, args.alloc_peak)
            est = plan([RECIPE, overlay(settings, work, name + "-plan")], work)
            row.update(plan_gib=est["total"] / 2**30, plan_lines_gib={k: v / 2**30 for k, v in est["lines"].items()},
                       tokens=est["clip"]["tokens"], params=est["components"]["backbone"]["params"],
                       trainable=est["components"]["backbone"]["trainable"])
            row["plan_error"] = row["plan_gib"] / row["peak_rss_gib"] - 1
            row["plan_error_steady"] = row["plan_gib"] / row["steady_rss_gib"] - 1
            if "alloc_peak_gib" in row:  # torch's allocations against the plan without its runtime line (the process)
                row["plan_tensors_gib"] = row["plan_gib"] - row["plan_lines_gib"]["runtime"]
                row["plan_error_alloc"] = row["plan_tensors_gib"] / row["alloc_peak_gib"] - 1
            results[name] = row
            if not args.smoke:
                store.write_text(json.dumps(results, indent=2))
        if not args.smoke and "plan-14b" not in results:
            est = plan([RECIPE, overlay({"model": {"backbone": {"init_args": {"config": "wan2.1-t2v-14b"}}}}, work, "14b")],
                       work)
            results["plan-14b"] = {"plan_gib": est["total"] / 2**30, "params": est["components"]["backbone"]["params"],
                                   "trainable": est["components"]["backbone"]["trainable"],
                                   "plan_lines_gib": {k: v / 2**30 for k, v in est["lines"].items()}}
            store.write_text(json.dumps(results, indent=2))
    for name, r in results.items():
        if "peak_rss_gib" in r:
            print(f"| {name} | {r['tokens']} | {r['step_s']:.1f} | {r['peak_rss_gib']:.2f} | {r['steady_rss_gib']:.2f} | "
                  f"{r['plan_gib']:.2f} | {100 * r['plan_error']:+.0f} % | {100 * r['plan_error_steady']:+.0f} % |",
                  file=sys.stderr)
    print(json.dumps({"bench": "real_scale", "results": results}))


if __name__ == "__main__":
    main()
