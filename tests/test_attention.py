"""Attention variants, the streaming K/V buffer, and diffusers interop."""

import pickle

import pytest
import torch

import tcplug
from tcplug.errors import TcplugError
from tcplug.module import TCPlugModule
from tests.conftest import RECIPES, run_tcplug

B, T, H, N, D = 2, 6, 2, 5, 8
CAUSAL = [("per_frame", {}), ("first_frame", {}), ("sparse_causal", {}), ("cross_frame", {"window": 2}),
          ("cross_frame", {"window": 1, "anchor": True}), ("temporal", {"causal": True}),
          ("temporal", {"causal": True, "window": 2}), ("cross_frame", {"window": 1, "history": [1, 2]})]
ALL = CAUSAL + [("temporal", {}), ("full3d", {}), ("cross_frame", {"window": 0}), ("shot", {"shot_frames": 2}),
                ("shot", {"shot_frames": [1, 3], "causal": True, "later": True})]


def variant(name, **kw):
    return tcplug.get_component("attention", name)(**kw)


def qkv(seed=0, t=T):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, t, H, N, D, generator=g) for _ in range(3)]


def ident(args):
    name, kw = args
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("spec", ALL, ids=[ident(a) for a in ALL])
def test_shapes_and_fast_path_equals_rule(spec):
    name, kw = spec
    a = variant(name, **kw)
    q, k, v = qkv()
    out = a(q, k, v)
    assert out.shape == q.shape
    ref = a.general(q, k, v, torch.arange(T))
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("spec", CAUSAL, ids=[ident(a) for a in CAUSAL])
def test_causal_variants_are_causal(spec):
    name, kw = spec
    a = variant(name, **kw)
    assert a.causal
    q, k, v = qkv()
    out = a(q, k, v)
    for n in range(T - 1):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, n + 1:] = torch.randn_like(x[:, n + 1:])
        assert torch.allclose(a(q2, k2, v2)[:, : n + 1], out[:, : n + 1], atol=1e-5), n


@pytest.mark.parametrize("spec", [("temporal", {}), ("full3d", {})], ids=["temporal", "full3d"])
def test_bidirectional_variants_see_the_future(spec):
    a = variant(spec[0], **spec[1])
    assert not a.causal
    q, k, v = qkv()
    k2 = k.clone()
    k2[:, -1] += 1
    assert not torch.allclose(a(q, k, v)[:, 0], a(q, k2, v)[:, 0])


def test_cross_frame_window_zero_equals_per_frame():
    q, k, v = qkv()
    assert torch.allclose(variant("cross_frame", window=0)(q, k, v), variant("per_frame")(q, k, v), atol=1e-6)


def test_full3d_with_one_frame_equals_per_frame():
    q, k, v = qkv(t=1)
    assert torch.allclose(variant("full3d")(q, k, v), variant("per_frame")(q, k, v), atol=1e-6)


def test_first_frame_and_cross_frame_see_other_frames():
    q, k, v = qkv()
    v2 = v.clone()
    v2[:, 0] += 1
    for a in (variant("first_frame"), variant("cross_frame", window=T), variant("sparse_causal")):
        assert not torch.allclose(a(q, k, v)[:, 3], a(q, k, v2)[:, 3])


@pytest.mark.parametrize("anchor", [False, True])
def test_cross_frame_window_bounds(anchor):
    """Frame n sees frames n-window .. n (and frame 0 with the anchor), and nothing older: in
    the fast path (strided views) and in the rule alike."""
    w = 2
    a = variant("cross_frame", window=w, anchor=anchor)
    q, k, v = qkv()
    n = T - 1
    for path in (a, lambda q, k, v: a.general(q, k, v, torch.arange(T))):  # fast path and the rule
        out = path(q, k, v)
        for f in range(T):
            k2, v2 = k.clone(), v.clone()
            k2[:, f] += 1.0
            v2[:, f] += 1.0
            changed = not torch.allclose(path(q, k2, v2)[:, n], out[:, n], atol=1e-6)
            visible = n - w <= f <= n or (anchor and f == 0)
            assert changed == visible, (f, visible)


def runs_equal(x, p):
    """``x (B, T, H, N, D)`` with each run of ``p`` consecutive tokens made equal (its first token)."""
    b, t, h, n, d = x.shape
    return x.unflatten(3, (n // p, p))[:, :, :, :, :1].expand(b, t, h, n // p, p, d).reshape(x.shape).clone()


@pytest.mark.parametrize("history,pool", [(3, 2), ([1, 2], 2), (2, 4)])
def test_compressed_history_is_the_window_where_runs_are_equal(history, pool):
    """A pooled token weighs as the run it stands for (its logit + log of the run's length): where
    every run of ``pool ** level`` tokens is equal, compressed history gives exactly the output
    of the uncompressed window over the same frames; elsewhere it differs (it is compressed)."""
    levels = [history] if isinstance(history, int) else history
    t, n = 9, 8 if len(levels) == 1 else 4  # 4 tokens: runs of 2 and of 2**2 = the whole frame
    g = torch.Generator().manual_seed(4)
    q, k, v = [torch.randn(B, t, H, n, D, generator=g) for _ in range(3)]
    p = pool ** len(levels)  # runs equal at the coarsest level are equal at every level
    k2, v2 = runs_equal(k, p), runs_equal(v, p)
    packed = variant("cross_frame", window=1, history=history, pool=pool)
    plain = variant("cross_frame", window=1 + sum(levels))
    assert torch.allclose(packed(q, k2, v2), plain(q, k2, v2), atol=1e-5)
    assert not torch.allclose(packed(q, k, v), plain(q, k, v), atol=1e-3)


def test_compressed_history_bounds():
    """Frame n sees frames n-window .. n as they are, the ``history`` frames before them pooled,
    and nothing older: the context is the same for every frame past the start, whatever the length."""
    w, hist = 1, [2, 1]
    a = variant("cross_frame", window=w, history=hist)
    assert a.memory() == (w + 3, 0)
    t = 8
    q, k, v = qkv(t=t)  # N = 5 tokens a frame: the pool (2) does not divide it, the last run is shorter
    out = a(q, k, v)
    last = t - 1
    for f in range(t):
        v2 = v.clone()
        v2[:, f] += 1.0
        changed = not torch.allclose(a(q, k, v2)[:, last], out[:, last], atol=1e-6)
        assert changed == (f >= last - w - sum(hist)), f


def test_invalid_arguments():
    with pytest.raises(tcplug.TcplugError):
        variant("cross_frame", window=-1)
    for bad in ({"history": -1}, {"history": [2, -1]}, {"pool": 1}):
        with pytest.raises(tcplug.TcplugError, match="history"):
            variant("cross_frame", **bad)
    with pytest.raises(NotImplementedError):
        variant("full3d").memory()
    with pytest.raises(NotImplementedError):
        variant("temporal").memory()


def model(attention, depth=2, seed=0):
    torch.manual_seed(seed)
    net = tcplug.get_component("backbone", "dit")(in_channels=3, patch_size=2, dim=32, depth=depth, heads=2,
                                                  attention=attention)
    for p in net.parameters():  # non-trivial weights (adaLN-Zero starts at zero)
        torch.nn.init.normal_(p, std=0.05)
    return TCPlugModule(backbone=net, sample_steps=4).eval()


STREAMABLE = [("per_frame", {}), ("first_frame", {}), ("sparse_causal", {}), ("cross_frame", {"window": 2}),
              ("cross_frame", {"window": 1, "sink": 3}),
              ("cross_frame", {"window": 1, "anchor": True}), ("temporal", {"causal": True, "window": 3}),
              ("cross_frame", {"window": 1, "history": [2, 2]}),
              ("cross_frame", {"window": 1, "anchor": True, "history": 2, "pool": 4})]


@pytest.mark.parametrize("spec", STREAMABLE, ids=[ident(a) for a in STREAMABLE])
def test_streamed_sampling_equals_all_at_once(spec):
    m = model(variant(spec[0], **spec[1]))
    frames, chunk = 10, 4
    whole = m.generate(1, frames, 8, 8, seed=3)
    streamed = torch.cat(list(m.stream(frames, 8, 8, chunk, seed=3)), dim=1)
    assert streamed.shape == whole.shape == (1, frames, 3, 8, 8)
    assert torch.allclose(streamed, whole, atol=1e-4), (streamed - whole).abs().max()


def test_per_block_attention_list_streams_too():
    m = model([variant("cross_frame", window=1), variant("temporal", causal=True, window=2)])
    whole = m.generate(1, 7, 8, 8, seed=1)
    streamed = torch.cat(list(m.stream(7, 8, 8, 3, seed=1)), dim=1)
    assert torch.allclose(streamed, whole, atol=1e-4)


def test_stream_buffer_is_bounded_by_the_window():
    from tcplug.diffusion.sampling import FrameStream, stream_sample

    m = model(variant("cross_frame", window=2, anchor=True))
    counts = []

    def fn(x, t, stream: FrameStream):
        out = m.backbone(x, t, {"stream": stream})
        counts.append(stream.buffered_frames())
        return out

    for _ in stream_sample(fn, (3, 8, 8), 24, 4, m.diffusion.schedule, steps=2):
        pass
    # per block and step: first frame + 2 window frames at most; never grows with the length
    assert max(counts) <= 2 * 2 * 3 and counts[-1] == counts[len(counts) // 2]


def test_an_ancestral_sampler_streams_and_equals_all_at_once():
    """Each frame draws its step noise from its own generator: an ancestral (ddpm) sampler gives
    the same frames chunk by chunk as all at once."""
    m = model(variant("cross_frame", window=2))
    m.diffusion.schedule.sampler = "ddpm"
    assert m.can_stream
    whole = m.generate(1, 9, 8, 8, seed=2)
    streamed = torch.cat(list(m.stream(9, 8, 8, 4, seed=2)), dim=1)
    assert torch.allclose(streamed, whole, atol=1e-4), (streamed - whole).abs().max()
    assert not torch.allclose(whole, m.generate(1, 9, 8, 8, seed=3), atol=1e-2)  # the noise is the seed's


def test_non_causal_variant_refuses_streaming():
    m = model(variant("full3d"))
    assert not m.can_stream
    with pytest.raises(TcplugError, match="does not support streaming"):
        list(m.stream(8, 8, 8, 4))


# ----- diffusers ----------------------------------------------------------------------------
def test_first_frame_matches_diffusers_cross_frame_processor():
    from diffusers.models.attention_processor import Attention
    from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (
        CrossFrameAttnProcessor2_0,
    )

    from tcplug.diffusers import attn_processor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=4, dim_head=8)
    frames = 5
    hidden = torch.randn(2 * frames, 16, 32)
    attn.set_processor(CrossFrameAttnProcessor2_0(batch_size=2))
    ref = attn(hidden)
    attn.set_processor(attn_processor("first_frame", num_frames=frames, batch_size=2))
    assert torch.allclose(attn(hidden), ref, atol=1e-5)


def test_cross_attention_is_untouched_and_cfg_mismatch_is_loud():
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from tcplug.diffusers import attn_processor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8)
    hidden, text = torch.randn(6, 16, 32), torch.randn(6, 7, 24)
    attn.set_processor(AttnProcessor2_0())
    ref = attn(hidden, encoder_hidden_states=text)
    attn.set_processor(attn_processor("cross_frame", num_frames=3, batch_size=2, window=1))
    assert torch.allclose(attn(hidden, encoder_hidden_states=text), ref, atol=1e-5)
    self_attn = Attention(query_dim=32, heads=4, dim_head=8)
    self_attn.set_processor(attn_processor("first_frame", num_frames=3, batch_size=1))
    with pytest.raises(tcplug.TcplugError, match="classifier-free guidance"):
        self_attn(hidden)  # 6 rows = 2 videos of 3 frames, but batch_size=1


# ----- the sample command -------------------------------------------------------------------
@pytest.mark.slow
def test_sample_command_long_video(tmp_path, tiny):
    # the recipe's ancestral sampler streams: each frame draws its step noise from its own generator
    proc = run_tcplug("fit", "--config", RECIPES / "cross_frame.yaml", *tiny, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    out = tmp_path / "long.mp4"
    proc = run_tcplug("sample", "--ckpt", ckpt, "--frames", 24, "--out", out, "--seed", 1, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from tcplug.video import read_video

    assert read_video(out).shape == (24, 16, 16, 3)
    # a video longer than one chunk gets its drift beside it, against the recipe's validation clips
    import json

    report = json.loads((tmp_path / "long.drift.json").read_text())
    assert len(report["starts"]) == 6 and "motion_ratio" in report["figures"] and "drift" in proc.stdout
    assert (tmp_path / "long.drift.png").is_file()


def test_sample_refuses_pickled_payload(tmp_path):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "tcplug_config": "model: {}", "payload": pickle.loads(pickle.dumps(Payload()))},
               ckpt)
    proc = run_tcplug("sample", "--ckpt", ckpt, "--frames", 4, "--out", tmp_path / "x.mp4")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "refused to load" in proc.stderr and not (tmp_path / "x.mp4").exists()
    proc = run_tcplug("sample", "--ckpt", tmp_path / "none.ckpt", "--frames", 4, "--out", tmp_path / "x.mp4")
    assert proc.returncode == 2 and "no such checkpoint" in proc.stderr


class Payload:
    """Stands for an arbitrary pickled object inside a stranger's checkpoint."""


FRAME_MASKED = [s for s in ALL if s[0] != "temporal"]  # temporal attends per location, not by frame blocks


@pytest.mark.parametrize("spec", FRAME_MASKED, ids=[ident(a) for a in FRAME_MASKED])
def test_block_sparse_flex_path_equals_sdpa(spec, monkeypatch):
    """The general (streaming) path through flex_attention with a block-sparse frame mask (and a
    score bias for compressed history; what a GPU uses) equals the SDPA path with a dense boolean mask; eager flex on the CPU here."""
    import tcplug_attention

    calls = []
    for name in ("flex_frames", "flex_biased"):  # (the second: compressed history's pooled tokens)
        real = getattr(tcplug_attention, name)
        monkeypatch.setattr(tcplug_attention, name, lambda *a, real=real: calls.append(1) or real(*a))
    torch.manual_seed(0)
    v = variant(spec[0], **spec[1])
    b, tk, tq, h, n, d = 1, 6, 3, 2, 4, 16
    q, k, val = torch.randn(b, tq, h, n, d), torch.randn(b, tk, h, n, d), torch.randn(b, tk, h, n, d)
    kv_index = torch.tensor([0, 3, 4, 5, 6, 7]) if v.causal else torch.arange(tk)
    v.backend = "sdpa"
    dense = v(q, k, val, kv_index)
    assert not calls
    v.backend = "flex"
    sparse = v(q, k, val, kv_index)
    assert calls  # the flex path ran
    assert torch.allclose(dense, sparse, atol=1e-5), (dense - sparse).abs().max()


def test_block_mask_skips_hidden_frames():
    """cross_frame (window 1) over 8 frames of 128 tokens: the block mask holds only the blocks of
    frames the rule shows (2 per query frame, 1 for frame 0), not all 64."""
    from tcplug_attention import frame_block_mask

    v = variant("cross_frame", window=1)
    idx = torch.arange(8)
    mask = v.allowed(idx[:, None], idx[None, :])
    block = frame_block_mask(mask, 128, "cpu")
    computed = int(block.kv_num_blocks.sum()) + int(block.full_kv_num_blocks.sum())  # partial + full blocks
    assert computed == 15  # 1 + 2 * 7 of 64 blocks


def test_frame_index_in_dit():
    """``context["frame_index"]`` reaches every dit block's variant as ``kv_index``: frames 0, 4, 8
    under ``cross_frame`` window 1 see only themselves (= ``per_frame``), and ``temporal``'s rotary
    frame positions follow the indices (a shift of all of them changes nothing)."""
    from tests.test_world import wake

    def net(name, **kw):
        torch.manual_seed(0)
        return wake(tcplug.get_component("backbone", "dit")(in_channels=3, patch_size=2, dim=32, depth=2, heads=2,
                                                             attention=variant(name, **kw))).eval()

    x, ts = torch.randn(1, 3, 3, 8, 8), torch.tensor([500.0])
    gapped = {"frame_index": [0, 4, 8]}
    with torch.no_grad():
        assert torch.allclose(net("cross_frame", window=1)(x, ts, gapped), net("per_frame")(x, ts), atol=1e-5)
        assert not torch.allclose(net("cross_frame", window=1)(x, ts), net("per_frame")(x, ts), atol=1e-4)
        temporal = net("temporal")
        assert torch.allclose(temporal(x, ts, {"frame_index": [3, 4, 5]}), temporal(x, ts), atol=1e-5)
        assert not torch.allclose(temporal(x, ts, gapped), temporal(x, ts), atol=1e-4)
