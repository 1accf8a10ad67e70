"""Every benchmark runs in smoke mode and prints one JSON line (no timing assertions)."""

import json
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))
#: benchmarks whose smoke run is a section of gpu_check.py's (run once, there), and gpu_check.py itself
#: (its own test below)
IN_GPU_CHECK = {"attention.py", "gpu.py", "streaming.py", "gpu_check.py"}
#: benchmarks whose smoke run another test makes (ablation.py: the sweep test's local run; overhead.py:
#: its Wan family test)
ELSEWHERE = IN_GPU_CHECK | {"ablation.py", "overhead.py"}


def run_script(script: str, *args: str, cwd) -> tuple[int, str, str]:
    """``python benchmarks/SCRIPT ARGS`` in this process (what a subprocess would spend starting
    and importing, ~12 s here, is not paid again); ``(status, stdout, stderr)``."""
    import contextlib
    import io
    import os
    import runpy
    import traceback
    import warnings

    out, err, here, argv, path = io.StringIO(), io.StringIO(), os.getcwd(), sys.argv, list(sys.path)
    environ = dict(os.environ)
    os.chdir(cwd)
    sys.argv, code = [str(BENCH / script), *args], 0
    sys.path.insert(0, str(BENCH))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(BENCH / script), run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, int) and exc.code is not None:
                    print(exc.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(here)
        sys.argv, sys.path[:] = argv, path
        os.environ.clear()
        os.environ.update(environ)
    return code, out.getvalue(), err.getvalue()


def test_every_benchmark_is_listed():
    assert set(SCRIPTS) >= {"attention.py", "flow_warp.py", "loader.py", "overhead.py", "sampling.py", "score.py",
                            "streaming.py"}


@pytest.mark.slow
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s not in ELSEWHERE])
def test_benchmark_smoke(script, tmp_path):
    code, out, err = run_script(script, "--smoke", cwd=tmp_path)
    assert code == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    assert json.loads(lines[0])["bench"] == script[:-3]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    """`gpu_check.py --smoke`: every section (the 1.3B LoRA step at a tiny shape through tcplug fit
    and a plain loop, attention, MFU, streaming) runs on the CPU and lands in one JSON file."""
    code, out, err = run_script("gpu_check.py", "--smoke", "--out", str(tmp_path / "g.json"), cwd=tmp_path)
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "g.json").read_text())
    sections = report["sections"]
    assert set(sections) == {"lora_1_3b", "attention", "mfu", "streaming"}
    assert all(s["status"] == "ok" for s in sections.values()), {k: s.get("stderr", s["status"])[-500:] for k, s in sections.items()}
    assert {s["result"]["bench"] for s in sections.values()} == {"gpu_check_lora", "attention", "gpu", "streaming"}
    lora = sections["lora_1_3b"]["result"]
    assert lora["tcplug"]["step_s"] > 0 and lora["plain"]["step_s"] > 0 and lora["plain_wide"]["shape"] == [5, 32, 48]


@pytest.mark.slow
def test_ablation_through_submitits_local_executor_gives_the_local_table(tmp_path):
    """`ablation.py --executor submitit-local`: the (row, seed) jobs run in submitit's job processes
    (their logs in OUT/sweep) and the gathered table is the local loop's: the same sampled clips,
    the same figures and intervals (the baseline row: the others' intervals draw on a bootstrap
    generator shared in row order). The local run is the ablation's smoke."""
    import numpy as np

    got = {}
    for ex, rows in (("local", []), ("submitit-local", ["--rows", "baseline"])):  # local: the smoke's own rows
        code, out, err = run_script("ablation.py", "--smoke", *rows, "--executor", ex, "--out", str(tmp_path / ex),
                                    cwd=tmp_path)
        assert code == 0, err[-3000:]
        line = json.loads([x for x in out.splitlines() if x.startswith("{")][-1])
        assert line["bench"] == "ablation"
        got[ex] = [r for r in json.loads((tmp_path / ex / "ablation.json").read_text())["rows"] if r["row"] == "baseline"]
    assert list((tmp_path / "submitit-local" / "sweep").glob("*_log.out"))  # the jobs ran through submitit
    assert not (tmp_path / "local" / "sweep").exists()
    for name in ("baseline-s0.npz",):
        a, b = (np.load(tmp_path / ex / "runs" / name)["video"] for ex in got)
        assert np.array_equal(a, b), name
    drop = ("train_wall_s", "trained_by")
    same = [json.dumps([{k: v for k, v in r.items() if k not in drop} for r in got[ex]], sort_keys=True) for ex in got]
    assert same[0] == same[1]  # (as text: NaN figures compare equal)


@pytest.mark.slow
def test_drift_through_submitits_local_executor_gives_the_local_result(tmp_path):
    """`drift.py --executor submitit-local`: the (mode, seed) streams run in submitit's job processes
    (their logs in OUT/sweep) and the gathered figures are the local loop's: the same videos, the
    same tables. The local run is the drift benchmark's smoke."""
    import numpy as np

    got = {}
    for ex in ("local", "submitit-local"):
        code, out, err = run_script("drift.py", "--smoke", "--modes", "same_step,clean", "--memory-lengths", "1",
                                    "--executor", ex, "--out", str(tmp_path / ex), cwd=tmp_path)
        assert code == 0, err[-3000:]
        got[ex] = json.loads((tmp_path / ex / "drift.json").read_text())
    assert list((tmp_path / "submitit-local" / "sweep").glob("*_log.out"))  # the streams ran through submitit
    assert not (tmp_path / "local" / "sweep").exists()
    for name in ("same_step-s0.npz", "clean-s0.npz"):
        a, b = (np.load(tmp_path / ex / "runs" / name)["videos"] for ex in got)
        assert np.array_equal(a, b), name
    for key in ("at", "summary", "paired_vs_same_step", "per_video"):
        assert json.dumps(got["local"][key], sort_keys=True) == json.dumps(got["submitit-local"][key], sort_keys=True)


def test_world_rollout_benchmark_scores_each_correction_and_its_controls(tmp_path):
    code, out, err = run_script("world_rollout.py", "--smoke", "--out", str(tmp_path / "w"), cwd=tmp_path)
    assert code == 0, err[-3000:]
    table = json.loads((tmp_path / "w" / "world_rollout.json").read_text())["table"]
    assert set(table) == {"truth", "still", "free flight", "additive", "reflect"}
    assert table["truth"]["position_error"]["chunk 0"][0] == 0.0


def test_state_estimator_benchmark_scores_one_and_two_frames_against_no_motion(tmp_path):
    code, out, err = run_script("state_estimator.py", "--smoke", "--out", str(tmp_path / "s"), cwd=tmp_path)
    assert code == 0, err[-3000:]
    rows = {r["row"]: r for r in json.loads((tmp_path / "s" / "state_estimator.json").read_text())["rows"]}
    assert set(rows) == {"control: no motion", "frames_seen 1", "frames_seen 2"}
    assert rows["control: no motion"]["velocity_px"] > 0 and 0 <= rows["frames_seen 2"]["bounced"] <= 1
    assert "| frames_seen 2 |" in out


def test_drift_compares_keyframes_first_with_streaming(tmp_path):
    """`drift.py --modes same_step,keyframes`: keyframes first (then in-betweens) is measured chunk
    by chunk like a stream and paired against same-step streaming."""
    code, out, err = run_script("drift.py", "--smoke", "--modes", "same_step,keyframes", "--stride", "2",
                                "--memory-lengths", "1", "--out", str(tmp_path / "d"), cwd=tmp_path)
    assert code == 0, err[-3000:]
    result = json.loads((tmp_path / "d" / "drift.json").read_text())
    assert "keyframes" in result["at"] and "keyframes" in result["paired_vs_same_step"]
    assert result["fps"]["keyframes"] > 0


def test_drift_pairs_another_checkpoint_on_the_same_videos(tmp_path):
    """`drift.py --versus LABEL=CKPT`: another checkpoint streamed on the same states, captions,
    seeds and noise, paired against same_step. The first checkpoint again (``twin=``) streams the
    same frames: every paired difference is exactly 0 (what pairing means)."""
    code, out, err = run_script("drift.py", "--smoke", "--modes", "same_step", "--versus", "twin=",
                                "--memory-lengths", "1", "--out", str(tmp_path / "d"), cwd=tmp_path)
    assert code == 0, err[-3000:]
    result = json.loads((tmp_path / "d" / "drift.json").read_text())
    a, b = (np.load(tmp_path / "d" / "runs" / f"{m}-s0.npz")["videos"] for m in ("same_step", "twin"))
    assert np.array_equal(a, b)
    paired = result["paired_vs_same_step"]["twin"]
    assert paired and all(v[0] == 0 for v in paired.values() if v[0] is not None), paired


@pytest.mark.slow
def test_overhead_benchmark_covers_the_wan_family(tmp_path):
    code, out, err = run_script("overhead.py", "--smoke", "--recipe", "wan", cwd=tmp_path)
    assert code == 0, err[-3000:]
    line = json.loads([x for x in out.splitlines() if x.startswith("{")][0])
    assert line["recipe"] == "recipes/wan/tiny.yaml" and line["plain_ms_per_step"] > 0


def test_ablation_improves_only_below_zero_and_through_the_gate():
    """A technique improves only when its paired Δ TVS interval is below 0 and the row with it passes
    the fidelity gate: a lower TVS from frozen or blurred samples fails the gate."""
    sys.path.insert(0, str(BENCH))
    from ablation import verdict

    ok = {"pass": True, "reasons": []}
    assert verdict([-3.0, -1.0], ok) == "improves"
    assert verdict([-1.0, 0.5], ok) == "does not improve (Δ TVS interval overlaps 0)"
    frozen = {"pass": False, "reasons": ["motion (motion_ratio 0 low: data 1, band [0.8, 1.25]x)"]}
    assert verdict([-3.0, -1.0], frozen) == "does not improve (fails the gate: motion)"


def test_ablation_intervals_are_paired():
    """Both rows share seeds, clips and noise: a constant per-clip improvement has a tight paired
    interval even when clips differ wildly among themselves (an unpaired interval would overlap 0)."""
    import numpy as np

    sys.path.insert(0, str(BENCH))
    from ablation import paired_delta

    rng = np.random.default_rng(0)
    base = [rng.uniform(0, 10, 32) for _ in range(3)]
    better = [b - 0.5 for b in base]
    d, ci = paired_delta(better, base, 200, np.random.default_rng(1))
    assert d == pytest.approx(-0.5) and ci[1] < 0 and ci[1] - ci[0] < 1e-9


def test_ablation_cache_key_sees_the_recipe_and_the_code():
    sys.path.insert(0, str(BENCH))
    from ablation import ROOT as AROOT
    from ablation import code_hash, packages_of, run_key

    recipe = AROOT / "recipes" / "cross_frame.yaml"
    code = code_hash()
    assert code_hash(["tcplug_losses"]) != code_hash(["tcplug_attention"]) != code
    from benchmarks._recipes import resolve

    assert packages_of(resolve(recipe)) == ["tcplug_attention", "tcplug_backbones", "tcplug_latents", "tcplug_losses"]
    key = run_key(recipe, [], 10, 4, code)
    assert key == run_key(recipe, [], 10, 4, code)
    assert key != run_key(recipe, [], 10, 4, code + "x")  # the code changed: retrain
    assert key != run_key(AROOT / "recipes" / "flow_warp.yaml", [], 10, 4, code)
    assert key != run_key(recipe, [], 11, 4, code)


def test_ablation_labels_say_what_a_row_reads():
    from torch import nn

    import tcplug

    sys.path.insert(0, str(BENCH))
    from ablation import knows

    physics = tcplug.get_component("conditioner", "physics_state")()
    caption = tcplug.get_component("conditioner", "caption")()
    depth = tcplug.get_component("conditioner", "depth")()
    assert knows(nn.ModuleList([physics, caption])) == ["privileged", "caption"]
    assert knows(nn.ModuleList([depth])) == ["oracle"]
    assert knows(nn.ModuleList([nn.Linear(1, 1)])) == ["nothing"]
    pixels = [tcplug.get_component("conditioner", "pixel_state")(frames_seen=n) for n in (1, 2)]
    assert knows(pixels[0]) == ["first-frame pixels"] and knows(pixels[1]) == ["first 2 frames' pixels"]


def test_cpu_peak_memory_counts_temporaries_an_op_frees_inside_itself():
    """A 3-D convolution on CPU allocates a column buffer in a child op and frees it in
    itself; the peak must include it (per-op self figures in start order miss it)."""
    from benchmarks._mem import peak_mib

    conv = torch.nn.Conv3d(8, 8, 3, padding=1)
    x = torch.randn(1, 8, 5, 64, 64)
    column = 8 * 27 * 5 * 64 * 64 * 4 / 2**20  # in-channels × kernel volume × output positions, fp32
    with torch.no_grad():
        peak = peak_mib(conv, x)
    assert peak >= column, (peak, column)


def test_cpu_peak_memory_is_the_high_water_mark_above_the_starting_level():
    from benchmarks._mem import peak_mib

    held = torch.empty(8 * 2**20, dtype=torch.uint8)  # allocated before: not counted

    def work():
        a = torch.empty(6 * 2**20, dtype=torch.uint8)
        del a
        return torch.empty(2 * 2**20, dtype=torch.uint8)

    assert peak_mib(work) == 6.0
    del held


def test_the_step_allocation_peak_counts_the_live_state_and_the_steps_activations(tmp_path, monkeypatch):
    """``_timing.PeakAlloc`` (real_scale.py --alloc-peak): the live parameters + AdamW state at the
    start of step 2, and the peak above it (a 32 MiB activation the step makes and frees)."""
    import lightning.pytorch as pl

    monkeypatch.syspath_prepend(str(BENCH))
    from _timing import PeakAlloc

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2**20))  # 4 MiB; AdamW adds 8 MiB, its gradient 4 MiB

        def training_step(self, batch, batch_idx):
            big = torch.ones(8 * 2**20) * self.w[0]  # 32 MiB, freed before the step ends
            return big.sum() + self.w.sum()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    out = tmp_path / "alloc.json"
    data = torch.utils.data.DataLoader(torch.zeros(2, 1))
    pl.Trainer(max_steps=2, callbacks=[PeakAlloc(out=str(out))], logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(Net(), data)
    got = json.loads(out.read_text())
    assert 16 - 0.1 <= got["live_gib"] * 1024 <= 16 + 0.1, got  # w, its gradient, exp_avg, exp_avg_sq
    assert got["above_start_gib"] * 1024 >= 32, got


def test_the_shots_gate_fails_a_generator_that_replays_its_training_clips(monkeypatch):
    """benchmarks/shots.py's gate per shot compares each shot with the recipes' training world:
    its own training clips fail on memorisation, clips of another seed do not."""
    monkeypatch.syspath_prepend(str(BENCH))
    import shots

    train, held, ref = (shots.world(s, 8, 16, 4) for s in (0, 4242, 4343))
    replay = shots.gate_per_shot(train, ref, held, 4, train)
    fresh = shots.gate_per_shot(shots.world(4545, 8, 16, 4), ref, held, 4, train)
    assert all(any(r.startswith("memorisation") for r in g["reasons"]) for g in replay), replay
    assert not any(r.startswith("memorisation") for g in fresh for r in g["reasons"]), fresh
    assert all(g["memorised"] == 1.0 for g in replay) and all(g["memorised"] < 0.25 for g in fresh)
