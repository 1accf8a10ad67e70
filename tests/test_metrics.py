"""Temporal metrics on analytic cases, `tcplug score`, and DDP agreement."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tcplug import TcplugError
from tcplug.metrics import Flicker, TemporalVarianceScore, WarpingError, valid_mask
from tests.conftest import run_tcplug

H = W = 64
T = 6
SHIFT = 2  # pixels per frame, leftwards


def translating_clip():
    """A smooth texture moving left by SHIFT px/frame, with its exact forward/backward flow."""
    yy, xx = torch.meshgrid(torch.arange(H).float(), torch.arange(W + T * SHIFT).float(), indexing="ij")
    tex = 0.5 + 0.2 * torch.sin(xx / 3) + 0.2 * torch.cos(yy / 4) + 0.05 * torch.sin((xx + yy) / 2)
    frames = torch.stack([tex[:, SHIFT * i: SHIFT * i + W] for i in range(T)])
    video = frames[None, :, None].repeat(1, 1, 3, 1, 1)
    fwd = torch.zeros(1, T - 1, 2, H, W)
    fwd[:, :, 0] = -SHIFT
    return video, fwd, -fwd


def tvs(video, fwd=None, bwd=None, mask=None):
    m = TemporalVarianceScore(region="all" if mask is None else "static")
    m.update(video, None if fwd is None else (fwd, bwd), None if mask is None else {"static": mask})
    return float(m.compute())


def test_static_clip_scores_zero():
    video, _, _ = translating_clip()
    static = video[:, :1].repeat(1, T, 1, 1, 1)
    assert tvs(static) < 1e-3
    f = Flicker()
    f.update(static)
    assert float(f.compute()) == pytest.approx(1.0)


def test_translation_zero_with_true_flow_and_small_with_estimated():
    video, fwd, bwd = translating_clip()
    assert tvs(video, fwd, bwd) < 1e-3
    assert tvs(video) < 0.5


@pytest.mark.parametrize("a", [0.02, 0.05, 0.1])
def test_brightness_flicker_raises_tvs_by_amplitude(a):
    video, fwd, bwd = translating_clip()
    flick = video.clone()
    flick[:, 1::2] += a  # every other frame brighter by a: each pair differs by a
    assert tvs(flick, fwd, bwd) - tvs(video, fwd, bwd) == pytest.approx(100 * a, rel=0.02)
    assert tvs(flick) - tvs(video) == pytest.approx(100 * a, rel=0.15)  # estimated flow


def test_tvs_grows_monotonically_with_noise():
    video, fwd, bwd = translating_clip()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(video.shape, generator=g)
    scores = [tvs((video + s * noise).clamp(0, 1), fwd, bwd) for s in (0.0, 0.01, 0.02, 0.05, 0.1)]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


def test_occluded_pixels_are_excluded():
    video, fwd, bwd = translating_clip()
    bad = video.clone()
    bad[:, 1:, :, 20:40, 20:40] = 1.0  # a square appears in frames >= 1 ...
    bwd_occ = bwd.clone()
    bwd_occ[:, 0, :, 20:40, 20:40] = 15.0  # ... and the backward flow there disagrees (occlusion)
    m = valid_mask(fwd[0, :1], bwd_occ[0, :1])
    assert m[0, 0, 25:35, 25:35].sum() == 0 and m[0, 0, :10, 5:15].sum() == 100
    err_masked = tvs(bad[:, :2], fwd[:, :1], bwd_occ[:, :1])
    err_unmasked = tvs(bad[:, :2], fwd[:, :1], bwd[:, :1])
    assert err_masked < 1e-3 < err_unmasked


def test_out_of_frame_pixels_are_excluded():
    video, fwd, bwd = translating_clip()
    m = valid_mask(fwd[0, :1], bwd[0, :1])
    assert m[0, 0, :, :SHIFT].sum() == 0  # these pixels leave the frame


def test_warping_error_and_flicker_known_values():
    video, fwd, bwd = translating_clip()
    flick = video.clone()
    flick[:, 1::2] += 0.1
    we = WarpingError()
    we.update(flick, (fwd, bwd))
    assert float(we.compute()) == pytest.approx(3 * 0.1**2, rel=0.02)  # squared norm over 3 channels
    f = Flicker()
    static = video[:, :1].repeat(1, T, 1, 1, 1)
    static[:, 1::2] += 0.1
    f.update(static.clamp(0, 1))
    assert float(f.compute()) == pytest.approx((255 - 25.5) / 255, abs=0.004)


def test_flicker_on_static_region_only():
    video, _, _ = translating_clip()
    static = video[:, :1].repeat(1, T, 1, 1, 1)
    static[:, 1::2, :, :, 32:] += 0.2  # the right half flickers
    mask = torch.zeros(1, 1, H, W)
    mask[..., :32] = 1
    f = Flicker(region="static")
    f.update(static.clamp(0, 1), batch={"static": mask})
    assert float(f.compute()) == pytest.approx(1.0)


def test_bad_input():
    with pytest.raises(TcplugError, match="at least 2 frames"):
        tvs(torch.rand(1, 1, 3, 8, 8))
    with pytest.raises(TcplugError, match=r"\(B, T, C, H, W\)"):
        tvs(torch.rand(3, 8, 8))


def test_score_command(tmp_path):
    from tcplug.video import write_video

    video, _, _ = translating_clip()
    frames = (video[0].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    np.save(tmp_path / "clip.npy", frames)
    write_video(frames, tmp_path / "clip.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all" * 10)
    np.save(tmp_path / "one.npy", frames[:1])
    np.save(tmp_path / "wrong.npy", np.zeros((4, 8, 8)))
    files = ["clip.npy", "missing.mp4", "empty.mp4", "garbage.mp4", "one.npy", "wrong.npy", "clip.mp4"]
    proc = run_tcplug("score", *files, "--json", cwd=tmp_path)
    assert proc.returncode == 1  # some failed, the others were still scored
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == ["clip.npy", "clip.mp4"]
    for r in rows:
        assert set(r) == {"path", "frames", "tvs", "warp_error", "flicker", "coverage"}
        assert r["frames"] == T and r["tvs"] < 0.5
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 5 and "Traceback" not in proc.stderr
    assert any("missing.mp4: no such file" in e for e in errors)
    assert any("need at least 2 frames" in e for e in errors)
    ok = run_tcplug("score", "clip.npy", "--size", "32", "--max-frames", "4", cwd=tmp_path)
    assert ok.returncode == 0 and "frames=4" in ok.stdout


DDP_SCRIPT = textwrap.dedent('''
    import os, sys, json, torch, torch.distributed as dist
    from tcplug.metrics import TemporalVarianceScore, WarpingError, Flicker
    def clips():
        g = torch.Generator().manual_seed(0)
        return torch.rand(4, 4, 3, 24, 24, generator=g)
    def run(rank, world, port, out):
        if world > 1:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            dist.init_process_group("gloo", rank=rank, world_size=world)
        video = clips()[rank::world]
        ms = [TemporalVarianceScore(), WarpingError(), Flicker()]
        for m in ms:
            for clip in video.split(1):
                m.update(clip)
        vals = [float(m.compute()) for m in ms]
        if rank == 0:
            json.dump(vals, open(out, "w"))
        if world > 1:
            dist.destroy_process_group()
    if __name__ == "__main__":
        world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        if world == 1:
            run(0, 1, port, out)
        else:
            torch.multiprocessing.spawn(run, args=(world, port, out), nprocs=world)
''')


@pytest.mark.slow
def test_ddp_agrees_with_single_process(tmp_path):
    import socket

    script = tmp_path / "ddp_metrics.py"
    script.write_text(DDP_SCRIPT)
    results = []
    for world in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp_path / f"out{world}.json"
        proc = subprocess.run([sys.executable, str(script), str(world), str(port), str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(out.read_text()))
    assert results[0] == pytest.approx(results[1], rel=1e-5)
