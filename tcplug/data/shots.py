"""A world with shots: one scene filmed as several shots, cut between cameras.

The same moving shapes as :mod:`tcplug.data.synthetic` live on a canvas twice the frame size
(``2S x 2S``). Each shot is filmed by a still camera: the **wide** shot shows the whole canvas at
half scale, a **close-up** shows an ``S x S`` quarter of it at full scale, framed on one object as
the shot starts. A cut changes the camera (wide to close-up, close-up to wide, or a close-up on
another object) and may jump forward in time (``jump``: world frames skipped at a cut); the physical
state (positions, velocities, bounces) continues across cuts, so every object keeps its class,
colour and size and is where its motion took it. The first shot is wide (an establishing shot).

World positions, radii and velocities are even integers, so in both cameras motion is in whole
pixels and the stored flow is exact within a shot, as in the one-camera world. A pair of frames
across a cut has no flow: its flow is 0 and every pixel is marked occluded.

:func:`make_shots` returns what :func:`~tcplug.data.synthetic.make_clip` returns (``T`` frames in
all, size ``S``; flow, occ, depth, skeleton, static, state, txt), plus:

=============  ======================  =====================================================
key            shape / type            meaning
=============  ======================  =====================================================
ids            (T, S, S) int8          the object each pixel shows (-1: background)
cuts           (T-1,) uint8            1 where frames ``n, n+1`` lie in different shots
state.shots    list of dicts           each shot's ``start`` frame, ``frames``, camera
                                       (``scale`` 2 = wide, 1 = close-up; canvas ``offset``),
                                       world ``time`` of its first frame and its own
                                       ``caption`` (``a wide shot``, ``a close-up of the
                                       red square``: the object it frames)
=============  ======================  =====================================================
"""

from __future__ import annotations

import numpy as np

from tcplug.data.synthetic import (
    CLASSES,
    COLOURS,
    WORLDS,
    _background,
    _caption,
    _gauss,
    _objects_state,
    _paint,
    _pair_flow,
    _simulate,
)


def _cameras(rng: np.random.Generator, shots: int, size: int, centres) -> tuple[list[tuple[int, int, int]], list]:
    """``(scale, ox, oy)`` per shot: wide first, then each cut to another camera; ``centres(k)``:
    the objects' canvas positions at shot ``k``'s start (a close-up frames one of them). Also the
    object each shot frames (None for a wide shot)."""
    cams, framed = [(2, 0, 0)], [None]
    for k in range(1, shots):
        while True:
            on = None
            if rng.random() < 0.5 and cams[-1][0] == 1:
                cam = (2, 0, 0)
            else:
                on = int(rng.integers(len(centres(k))))
                pos = centres(k)[on]
                ox, oy = (int(np.clip(c - size // 2, 0, size)) // 2 * 2 for c in pos)
                cam = (1, ox, oy)
            # a cut must change the camera: a close-up elsewhere moves by a quarter frame at least
            prev = cams[-1]
            if cam[0] != prev[0] or abs(cam[1] - prev[1]) + abs(cam[2] - prev[2]) >= size // 4:
                break
            if prev[0] == 1 and rng.random() < 0.5:  # a close-up whose objects sit together: cut wide
                cam, on = (2, 0, 0), None
                break
        cams.append(cam)
        framed.append(on if cam[0] == 1 else None)
    return cams, framed


def _shot_caption(objs: list[dict], on: int | None) -> str:
    """A shot's own caption: ``a wide shot`` or ``a close-up of the <colour> <class>``."""
    if on is None:
        return "a wide shot"
    return f"a close-up of the {objs[on]['colour_name']} {objs[on]['class']}"


def make_shots(seed: int, index: int, shots: int = 4, shot_frames: int = 8, size: int = 32, num_shapes: int = 2,
               gravity: float = 0.0, max_speed: int | None = None, world: str = "simple",
               jump: int = 4) -> dict:
    """Clip ``index`` of the multi-shot world seeded by ``seed``: ``shots`` shots of
    ``shot_frames`` frames each (see the module docstring). ``jump``: at each cut the world moves
    on by 0 .. ``jump`` unseen frames."""
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {world!r}")
    if shots < 1 or shot_frames < 2:
        raise ValueError(f"need shots >= 1 and shot_frames >= 2, got {shots} and {shot_frames}")
    rng = np.random.default_rng([seed, index, 7])
    canvas = 2 * size
    max_speed = max_speed or max(1, size // 16)
    bg = _background(rng, canvas, world)
    names = list(COLOURS)
    objs = []
    for _ in range(num_shapes):
        lo_r, hi_r = (max(2, size // 7), max(3, size // 4)) if world == "simple" else (max(2, size // 10), max(3, size // 5))
        r = int(rng.integers(lo_r, hi_r + 1))  # radius in the wide view; 2r on the canvas
        obj = {"class": CLASSES[int(rng.integers(len(CLASSES)))], "colour_name": names[int(rng.integers(len(names)))],
               "size": r, "depth": float(rng.uniform(0.2, 0.9)), "stripe": float(rng.uniform(0.25, 0.75)),
               "pos": 2 * rng.integers(r, size - r, 2).astype(np.int64),
               "vel": 2 * rng.integers(-max_speed, max_speed + 1, 2).astype(np.int64)}
        if not obj["vel"].any():
            obj["vel"][int(rng.integers(2))] = 2
        objs.append(obj)
    jumps = [0] + [int(rng.integers(0, jump + 1)) for _ in range(shots - 1)]
    times = np.cumsum([0] + [shot_frames + j for j in jumps[1:]])  # world time of each shot's first frame
    total = int(times[-1]) + shot_frames
    g = 2 * int(round(gravity))

    # the world runs on, seen or not (bounces on the canvas walls)
    positions, velocities = _simulate(objs, total, g, lambda o: (2 * o["size"], canvas - 2 - 2 * o["size"]))
    cams, framed = _cameras(rng, shots, size, lambda k: positions[times[k]])

    order = sorted(range(num_shapes), key=lambda i: -objs[i]["depth"])
    vv, uu = np.mgrid[0:size, 0:size]
    frames, ids_all, depths, skeletons, cam_of, world_t = [], [], [], [], [], []
    for k, (s, ox, oy) in enumerate(cams):
        xx, yy = ox + s * uu, oy + s * vv  # canvas coordinates of the view's pixels
        view_bg = bg[yy, xx]
        for f in range(shot_frames):
            t = int(times[k]) + f
            img, ids = view_bg.copy(), np.full((size, size), -1, np.int64)
            depth = np.ones((size, size), np.float32)
            centres, corners = [], []
            for i in order:
                o = objs[i]
                cx, cy = positions[t, i]
                _paint(img, ids, depth, o, i, xx - cx, yy - cy, 2 * o["size"], world)
                vx, vy, vr = (cx - ox) / s, (cy - oy) / s, 2 * o["size"] / s
                centres.append((vx, vy))
                corners += [(vx - vr, vy - vr), (vx + vr, vy - vr), (vx - vr, vy + vr), (vx + vr, vy + vr)]
            frames.append(np.clip(img, 0, 255).round().astype(np.uint8))
            ids_all.append(ids)
            depths.append(depth)
            skeletons.append(np.stack([_gauss(size, centres), _gauss(size, corners)]))
            cam_of.append(k)
            world_t.append(t)

    n = len(frames)
    ids = np.stack(ids_all)
    flow = np.zeros((n - 1, size, size, 2), np.float32)
    flow_bwd = np.zeros_like(flow)
    occ = np.ones((n - 1, size, size), np.uint8)
    cuts = np.zeros(n - 1, np.uint8)
    for t in range(n - 1):
        if cam_of[t] != cam_of[t + 1]:
            cuts[t] = 1
            continue
        disp = (positions[world_t[t + 1]] - positions[world_t[t]]) // cams[cam_of[t]][0]
        occ[t] = _pair_flow(ids[t], ids[t + 1], disp, flow[t], flow_bwd[t])

    state = {
        "size": size, "frames": n, "gravity": g // 2, "canvas": canvas, "objects": _objects_state(objs),
        "position": positions[world_t].tolist(), "velocity": velocities[world_t].tolist(),
        "shots": [{"start": k * shot_frames, "frames": shot_frames, "scale": s, "offset": [ox, oy],
                   "time": int(times[k]), "caption": _shot_caption(objs, framed[k])}
                  for k, (s, ox, oy) in enumerate(cams)],
    }
    caption = _caption(objs, g, world) + f", in {shots} shots"
    return {
        "frames": np.stack(frames), "flow": flow, "flow_bwd": flow_bwd, "occ": occ,
        "depth": np.stack(depths).astype(np.float16), "skeleton": np.stack(skeletons).astype(np.float16),
        "static": (ids.max(0) < 0).astype(np.uint8), "ids": ids.astype(np.int8), "cuts": cuts,
        "state": state, "txt": caption,
    }

