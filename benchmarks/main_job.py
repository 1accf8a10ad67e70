"""README command 1 measured: samples of a trained run beside the data, with the figures.

Loads a run's ``last.ckpt`` (the EMA weights when the recipe averages them), samples
``--clips`` clips conditioned on the first validation clips (their pixels withheld), scores
them and the data clips they were conditioned on (the data floor) with the same code and DIS
flow as ``benchmarks/ablation.py``, against a reference set of other clips of the same world,
and renders a strip: data clip, sample, data clip, sample, ... (frames left to right).
Prints one JSON line.

Usage:
  tcplug fit --config recipes/full.yaml                       # README command 1
  python benchmarks/main_job.py --run runs/full/version_0 --img docs/img/main_job.png --rows 6
  python benchmarks/main_job.py --smoke                        # trains a tiny run first
  python benchmarks/main_job.py --run runs/full/version_0 --trajectory docs/img/main_job_x0.png

``--trajectory PNG`` shows whether sampling keeps what one-shot denoising finds, for the first
clip: the model's x0 prediction from the data clip noised to a few timesteps (rows 1-5), beside
its x0 prediction along its own sampling trajectory at the nearest sampler steps (rows 6-10);
the data clip above each. The JSON line's ``trajectory`` holds each one-shot prediction's mean
squared error and the clip's latent variance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import PER_CLIP, SMOKE, data_clips, mean_ci, per_clip, sample, world_clips  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def strip(data: torch.Tensor, gen: torch.Tensor, path: Path, rows: int = 3) -> None:
    """Interleaved rows (data clip i, sample i), frames left to right, 3x upscaled PNG."""
    from PIL import Image

    to_u8 = lambda v: (v.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()  # noqa: E731
    d, g = to_u8(data[:rows]), to_u8(gen[:rows])
    sep = np.full((2, d.shape[1] * d.shape[3], 3), 255, np.uint8)
    lines = []
    for a, b in zip(d, g):
        lines += [np.concatenate(list(a), axis=1), np.concatenate(list(b), axis=1), sep]
    img = np.concatenate(lines[:-1], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).resize((img.shape[1] * 3, img.shape[0] * 3), Image.NEAREST).save(path)


def trajectory(model, batch: dict, path: Path, levels=(999, 900, 800, 600, 400), seed: int = 0) -> dict:
    """x0 predictions of the first clip, one-shot from the noised data and along the sampler's
    own trajectory (the same conditioning, guidance and steps as ``generate``); see the
    module docstring. Returns the one-shot MSE per timestep and the clip's latent variance."""
    one = {k: (v[:1] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
    video = one["video"].float()
    cond = {k: v for k, v in one.items() if k != "video"}
    _, t, _, h, w = video.shape
    with torch.no_grad():
        z0 = model.latent.encode(video.to(model.device))
        context = model.diffusion.context({**cond, "frame_size": (h, w), "num_clips": 1, "num_frames": t}, tuple(z0.shape))
        null = model.diffusion.null_context(context)
        gen = torch.Generator().manual_seed(seed)
        shots, mse = [], {}
        for level in levels:
            tt = torch.full((1,), level, device=model.device)
            xt = model.diffusion.schedule.add_noise(z0, torch.randn(z0.shape, generator=gen).to(z0), tt)
            x0 = model.diffusion.schedule.pred_x0(xt, model.diffusion.guided(xt, tt, context, null, model.diffusion.guidance_scale), tt)
            mse[level] = round(float(((x0 - z0) ** 2).mean()), 4)
            shots.append(model.latent.decode(x0))
        seen: list[tuple[float, torch.Tensor]] = []
        guided = model.diffusion.guided

        def record(xt, timesteps, ctx, nul, scale):  # the sampler's own call, x0 kept
            out = guided(xt, timesteps, ctx, nul, scale)
            tt = timesteps.reshape(timesteps.shape[0], -1).amax(1)
            seen.append((float(tt[0]), model.diffusion.schedule.pred_x0(xt, out, tt)[:1]))
            return out

        model.diffusion.guided = record
        try:
            model.generate(1, t, h, w, seed=seed, batch=cond, lock=False)
        finally:
            del model.diffusion.guided
        along = [model.latent.decode(min(seen, key=lambda s: abs(s[0] - level))[1]) for level in levels]
    data = (video + 1) / 2
    gen_rows = torch.cat([(torch.cat(r).float().cpu() + 1) / 2 for r in (shots, along)])
    strip(data.expand(len(gen_rows), *data.shape[1:]), gen_rows, path, rows=len(gen_rows))
    return {"one_shot_x0_mse": mse, "latent_variance": round(float(z0.var()), 4)}


def scored(video: torch.Tensor, data: torch.Tensor, ref: torch.Tensor, batch: dict, boot: int) -> dict:
    """Per-clip means with 95 % bootstrap intervals over the clips (one training run; the
    ablation adds seeds) of the generated clips and of the data clips they were conditioned on,
    and the fidelity gate of the former against the latter (the floor)."""
    from tcplug.metrics.gate import ClipSet, evaluate

    rng = np.random.default_rng(0)
    out = {}
    for name, v in (("generated", video), ("data_floor", data)):
        per = per_clip(v, batch)
        out[name] = {k: [round(x, 4) for x in (lambda m, ci: [m, *ci])(*mean_ci([per[k]], boot, rng))]
                     for k in PER_CLIP}
    report = evaluate(ClipSet(video, batch.get("state")), ClipSet(data, batch.get("state")), ClipSet(ref))
    for name, side, ci in (("generated", "figures", "intervals"), ("data_floor", "floor", "floor_intervals")):
        out[name].update({k: [round(v, 4), *[round(x, 4) for x in report[ci][k]]] for k, v in report[side].items()})
    out["gate"] = report["gate"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a run folder of `tcplug fit` (holding checkpoints/last.ckpt)")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--reference", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--img", default=None, help="write the strip here (PNG)")
    p.add_argument("--rows", type=int, default=3, help="clips in the strip (data clip above its sample)")
    p.add_argument("--boot", type=int, default=300, help="bootstrap resamples of the clips")
    p.add_argument("--trajectory", default=None, help="write the x0-prediction diagnostic here (PNG)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else None
        if args.smoke:
            args.clips, args.reference, args.boot = 2, 4, 10
            args.trajectory = args.trajectory or str(Path(tmp) / "x0.png")  # the diagnostic runs too
            proc = subprocess.run([sys.executable, "-m", "tcplug", "fit", "--config", str(ROOT / "recipes" / "full.yaml"),
                                   "--config", str(SMOKE), f"--trainer.logger.init_args.save_dir={tmp}"], cwd=tmp,
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-2000:])
            run = next(Path(tmp).rglob("version_0"))
        if run is None:
            raise SystemExit("give --run RUN_FOLDER (or --smoke)")
        ckpt = run / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise SystemExit(f"{ckpt}: no checkpoint")
        import yaml

        cfg = yaml.safe_load((run / "config.yaml").read_text())
        t0 = time.perf_counter()
        batch = data_clips(cfg["data"], args.clips)
        from ablation import knows

        from tcplug.module import TCPlugModule

        model = TCPlugModule.from_checkpoint(str(ckpt))
        found = {"trajectory": trajectory(model, batch, Path(args.trajectory), seed=args.seed)} if args.trajectory else {}
        video = sample(model, batch, args.seed)
        data = (batch["video"].float() + 1) / 2
        figures = scored(video, data, world_clips(cfg["data"], 777, args.reference)[0], batch, args.boot)
        if args.img:
            strip(data, video, Path(args.img), rows=args.rows)
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
        print(json.dumps({"bench": "main_job", "run": str(run), "global_step": metrics.get("global_step"),
                          "clips": args.clips, "reference": args.reference, "knows": knows(model),
                          "values": "[value, 95 % low, 95 % high]", **figures, **found,
                          "score_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
