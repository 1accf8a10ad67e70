"""One GPU check: every GPU figure the docs promise, in one command and one JSON file, within a
time budget (default 8 minutes on one H100/H200).

Sections, each run in its own process with its share of the budget (a section that fails or runs
out of time is recorded as such; the others still run):

- ``lora_1_3b``: the Wan2.1-T2V-1.3B transformer (published shape, random weights), LoRA rank 32,
  gradient checkpointing, bf16: one training step's time and peak memory through `tcplug fit`
  (recipes/wan/cpu-1.3b.yaml on the GPU, 33 frames of 480 x 480: the data module makes square
  clips) and through a plain PyTorch loop at the same shape and at 480 x 832; with `tcplug plan`'s
  estimate of the same step;
- ``attention``: masked against dense attention per variant (benchmarks/attention.py);
- ``mfu``: the `dit` training step's model FLOP utilisation per variant (benchmarks/gpu.py);
- ``streaming``: frames per second and peak memory of streaming the tiny Wan family to 16x its
  clip (benchmarks/streaming.py).

  python benchmarks/gpu_check.py --out gpu_check.json        # on the GPU machine
  python benchmarks/gpu_check.py --smoke                     # CPU, tiny shapes, the same code path

Prints one JSON line (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
#: section -> (its share of the budget, command line on the GPU, command line with --smoke)
SECTIONS = {
    "lora_1_3b": (0.45, [str(BENCH / "gpu_check.py"), "--lora-step"], [str(BENCH / "gpu_check.py"), "--lora-step", "--smoke"]),
    "attention": (0.15, [str(BENCH / "attention.py")], [str(BENCH / "attention.py"), "--smoke"]),
    "mfu": (0.2, [str(BENCH / "gpu.py"), "--steps", "10", "--warmup", "3"], [str(BENCH / "gpu.py"), "--smoke"]),
    "streaming": (0.2, [str(BENCH / "streaming.py"), "--recipe", str(ROOT / "recipes" / "wan" / "tiny.yaml"), "--mult", "16",
                        "--steps", "10"], [str(BENCH / "streaming.py"), "--smoke"]),
}
TINY_WAN = {"patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
            "out_channels": 16, "text_dim": 32, "freq_dim": 64, "ffn_dim": 64, "num_layers": 2, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32}


def last_json(text: str) -> dict | None:
    lines = [x for x in text.splitlines() if x.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def run_section(cmd: list[str], timeout: float) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")])))
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": round(time.perf_counter() - start, 1)}
    result = last_json(proc.stdout)
    if proc.returncode or result is None:
        return {"status": "failed", "seconds": round(time.perf_counter() - start, 1), "stderr": proc.stderr[-2000:]}
    return {"status": "ok", "seconds": round(time.perf_counter() - start, 1), "result": result}


# ----- the 1.3B LoRA step ---------------------------------------------------------------------
def plain_step(smoke: bool, height: int, width: int, frames: int, steps: int) -> dict:
    """The 1.3B transformer with LoRA in a plain PyTorch loop: flow-matching loss on random latents."""
    import torch
    from tcplug_wan import WanBackbone

    from tcplug.lora import LoraSpec, apply_lora

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    net = WanBackbone(config=dict(TINY_WAN) if smoke else "wan2.1-t2v-1.3b", dtype="bfloat16" if cuda else None,
                      gradient_checkpointing=True)
    apply_lora(net, LoraSpec(rank=4 if smoke else 32))
    net.to(device).train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    latent = (1, (frames - 1) // 4 + 1, 16, height // 8, width // 8)
    text = torch.zeros(1, 512 if not smoke else 4, net.text_dim, device=device)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        t0 = time.perf_counter()
        x0 = torch.randn(latent, device=device)
        noise = torch.randn_like(x0)
        sigma = torch.rand(1, device=device)
        xt = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            pred = net(xt, sigma * 1000, {"text": text})
        loss = (pred.float() - (noise - x0)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    warm = times[1:] if len(times) > 1 else times
    return {"shape": [frames, height, width], "latent": list(latent), "step_s": sorted(warm)[len(warm) // 2],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def tcplug_step(smoke: bool, size: int, frames: int, steps: int, work: Path) -> dict:
    """The same step through `tcplug fit` (recipes/wan/cpu-1.3b.yaml on the GPU, bf16), with
    `tcplug plan`'s estimate of it (benchmarks/real_scale.py's helpers)."""
    import _inproc
    import torch
    from real_scale import RECIPE, env, overlay, plan

    cuda = torch.cuda.is_available()
    settings = {"trainer": {"max_steps": steps, "accelerator": "gpu" if cuda else "cpu",
                            "precision": "bf16-mixed" if cuda else "32-true", "enable_progress_bar": False},
                "model": {"backbone": {"init_args": {"dtype": "bfloat16"} if cuda else {}}},
                "data": {"frames": frames, "size": size, "epoch_batches": steps + 2}}
    if smoke:
        settings["model"]["backbone"]["init_args"]["config"] = dict(TINY_WAN)
        settings["model"]["lora"] = {"rank": 4}
    path = overlay(settings, work, "gpu")
    out, peak = work / "steps.json", work / "peak.json"
    proc = _inproc.tcplug(["fit", "--config", str(RECIPE), "--config", str(path),
                           "--trainer.callbacks+=_timing.StepTimer", f"--trainer.callbacks.init_args.out={out}",
                           "--trainer.callbacks+=_timing.PeakCUDA", f"--trainer.callbacks.init_args.out={peak}"],
                          work, in_process=smoke, env=env())  # the smoke's tiny fit: no second interpreter
    if proc.returncode:
        raise SystemExit(f"tcplug fit failed\n{proc.stderr[-3000:]}")
    times = json.loads(out.read_text())
    warm = times[1:] if len(times) > 1 else times
    return {"shape": [frames, size, size], "step_s": sorted(warm)[len(warm) // 2],
            "peak_gib": json.loads(peak.read_text())["peak_gib"], "plan_gib": plan([RECIPE, path], work, in_process=smoke)["total"] / 2**30}


def lora_step(smoke: bool) -> dict:
    frames, size, wide, steps = (5, 32, 48, 2) if smoke else (33, 480, 832, 5)
    with tempfile.TemporaryDirectory() as tmp:
        out = {"tcplug": tcplug_step(smoke, size, frames, steps, Path(tmp)),
               "plain": plain_step(smoke, size, size, frames, steps),
               "plain_wide": plain_step(smoke, size, wide, frames, steps)}
    t, p = out["tcplug"]["step_s"], out["plain"]["step_s"]
    out["tcplug_over_plain"] = round(t / p, 3) if p else None
    return {"bench": "gpu_check_lora", **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for every section together")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--lora-step", action="store_true", help=argparse.SUPPRESS)  # the lora_1_3b section itself
    args = parser.parse_args()
    if args.lora_step:
        print(json.dumps(lora_step(args.smoke)))
        return
    import torch

    report = {"bench": "gpu_check", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "smoke": args.smoke, "budget_s": args.budget, "sections": {}}
    start = time.perf_counter()
    for name, (share, cmd, smoke_cmd) in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        left = args.budget - (time.perf_counter() - start)
        if left <= 5:
            report["sections"][name] = {"status": "skipped: the budget is spent"}
            continue
        report["sections"][name] = run_section(smoke_cmd if args.smoke else cmd, min(left, max(share * args.budget, 30.0)))
    report["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
