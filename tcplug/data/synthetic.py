"""The synthetic world: moving, occluding shapes over a static background.

Two difficulties (``world``): ``simple`` (the default for training recipes) has a smooth
background (a base colour and one low-frequency stripe pattern) and larger flat-coloured shapes;
``textured`` has a background of three sinusoids plus a checker and shapes with an
object-local stripe texture, which a small model needs far longer to learn.

Each clip is generated from ``(seed, index)`` alone, reproducible anywhere. Shapes
(circle, square, triangle, diamond) have random colours, sizes, depths and an object-local
stripe texture; they move at constant velocity (plus optional gravity), bounce off the
walls, and occlude each other by depth. Motion is in whole pixels per frame, so the stored
flow is exact: warping frame ``n+1`` back with it reproduces frame ``n`` bit for bit on
non-occluded pixels, bounces included.

:func:`make_clip` returns (``T`` frames, size ``S``, ``K`` objects):

=============  ======================  =====================================================
key            shape / type            meaning
=============  ======================  =====================================================
frames         (T, S, S, 3) uint8      RGB frames
flow           (T-1, S, S, 2) float32  forward flow n -> n+1 in pixels (x, y)
flow_bwd       (T-1, S, S, 2) float32  backward flow n+1 -> n
occ            (T-1, S, S) uint8       1 where pixel of frame n is not visible in n+1
depth          (T, S, S) float16       depth of the visible surface (background = 1)
skeleton       (T, 2, S, S) float16    keypoint heatmaps: object centres, bounding-box corners
static         (S, S) uint8            1 where no object covers the pixel in any frame
state          dict                    per-frame object state (position, velocity, size, class, colour)
txt            str                     a caption
=============  ======================  =====================================================
"""

from __future__ import annotations

import numpy as np

CLASSES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 50, 45), "green": (40, 170, 70), "blue": (45, 90, 225), "yellow": (240, 205, 40),
    "magenta": (205, 65, 200), "cyan": (40, 205, 215), "orange": (245, 140, 30), "white": (235, 235, 235),
}


WORLDS = ("simple", "textured")


def _background(rng: np.random.Generator, size: int, world: str = "textured") -> np.ndarray:
    """Static background ``(S, S, 3)`` float in [0, 255]: ``textured``: a few random sinusoids
    and a checker; ``simple``: one low-frequency stripe pattern over a base colour."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(60, 140, size=3).astype(np.float32)
    if world == "simple":
        fx, fy = rng.uniform(0.5, 1.5, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None]
        return np.clip(base + rng.uniform(15, 30, size=3) * wave, 0, 255)
    tex = np.zeros((size, size, 3), np.float32)
    for _ in range(3):
        fx, fy = rng.uniform(1, 5, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        tex += rng.uniform(8, 22, size=3) * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None]
    cells = max(2, size // 8)
    checker = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2)[..., None] * rng.uniform(-12, 12)
    return np.clip(base + tex + checker, 0, 255)


def _shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r * 1.3
    # triangle pointing up, inscribed in the box of half-size r
    return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)


def _gauss(size: int, points: list[tuple[float, float]], sigma: float = 1.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.zeros((size, size), np.float32)
    for x, y in points:
        out = np.maximum(out, np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)))
    return out


def _paint(img: np.ndarray, ids: np.ndarray, depth: np.ndarray, o: dict, i: int, dx: np.ndarray, dy: np.ndarray,
           r: float, world: str) -> None:
    """Draw object ``o`` (index ``i``) of radius ``r`` over ``img`` ``(S, S, 3)``, ``ids`` and
    ``depth``, at pixel offsets ``dx, dy`` from its centre; an object-local stripe texture in the
    textured world, a flat colour in the simple one."""
    m = _shape_mask(o["class"], dx, dy, r)
    colour = np.array(COLOURS[o["colour_name"]], np.float32)
    shade = 0.8 + 0.2 * np.sin((dx + dy) * o["stripe"]) if world == "textured" else np.ones_like(dx, np.float32)
    img[m] = colour * shade[m][:, None]
    ids[m], depth[m] = i, o["depth"]


def _simulate(objs: list[dict], frames: int, gravity: int, walls) -> tuple[np.ndarray, np.ndarray]:
    """Move the objects (their ``pos``, ``vel`` advance in place) for ``frames`` frames at constant
    velocity plus ``gravity`` (pixels/frame^2, downwards), bouncing off ``walls(o) -> (lo, hi)`` (the
    range of the object's centre on both axes); positions and velocities ``(frames, K, 2)``."""
    positions = np.zeros((frames, len(objs), 2), np.int64)
    velocities = np.zeros((frames, len(objs), 2), np.int64)
    for t in range(frames):
        for i, o in enumerate(objs):
            positions[t, i], velocities[t, i] = o["pos"], o["vel"]
            o["vel"] = o["vel"] + np.array([0, gravity])
            nxt = o["pos"] + o["vel"]
            lo, hi = walls(o)
            for d in range(2):
                if nxt[d] < lo:
                    nxt[d], o["vel"][d] = 2 * lo - nxt[d], -o["vel"][d]
                elif nxt[d] > hi:
                    nxt[d], o["vel"][d] = 2 * hi - nxt[d], -o["vel"][d]
            o["pos"] = nxt
    return positions, velocities


def _pair_flow(ids: np.ndarray, ids_next: np.ndarray, disp: np.ndarray, flow: np.ndarray,
               flow_bwd: np.ndarray) -> np.ndarray:
    """Fill one pair's forward and backward flow ``(S, S, 2)`` in place from each object's whole-pixel
    displacement ``disp`` ``(K, 2)`` and the pixels' object ids ``(S, S)`` of both frames; returns
    the pair's occlusion mask ``(S, S)`` uint8 (1 where pixel ``n`` is not visible in ``n+1``)."""
    size = ids.shape[0]
    for i in range(len(disp)):
        flow[ids == i] = disp[i]
        flow_bwd[ids_next == i] = -disp[i]
    yy, xx = np.mgrid[0:size, 0:size]
    tx = xx + flow[..., 0].astype(np.int64)
    ty = yy + flow[..., 1].astype(np.int64)
    inside = (tx >= 0) & (tx < size) & (ty >= 0) & (ty < size)
    same = np.zeros_like(inside)
    same[inside] = ids_next[ty[inside], tx[inside]] == ids[inside]
    return (~same).astype(np.uint8)


def _objects_state(objs: list[dict]) -> list[dict]:
    """What ``state["objects"]`` says of each object (class, colour, size, depth)."""
    return [{"class": o["class"], "colour": list(COLOURS[o["colour_name"]]), "colour_name": o["colour_name"],
             "size": o["size"], "depth": round(o["depth"], 4)} for o in objs]


def _caption(objs: list[dict], gravity: int, world: str) -> str:
    desc = [f"a {o['colour_name']} {o['class']}" for o in objs]
    motion = "bounce and fall" if gravity else "move"
    return (", ".join(desc[:-1]) + " and " + desc[-1] if len(desc) > 1 else desc[0]) + \
        f" {motion} over a {'textured' if world == 'textured' else 'striped'} background"


def make_clip(seed: int, index: int, frames: int = 8, size: int = 32, num_shapes: int = 2,
              gravity: float = 0.0, max_speed: int | None = None, world: str = "textured", stride: int = 1) -> dict:
    """Generate clip ``index`` of the world seeded by ``seed`` (see the module docstring).

    ``world``: ``simple`` or ``textured`` (the difficulty, see the module docstring).
    ``stride``: the world is simulated for ``frames * stride`` steps and every ``stride``-th one
    is rendered (a keyframe clip: the same world, ``stride`` times sparser in time); the flow,
    occlusion and positions are of the rendered frames, ``state["velocity"]`` stays per step and
    ``state["stride"]`` says so. ``stride=1`` is the clip it always was."""
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {world!r}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    rng = np.random.default_rng([seed, index])
    max_speed = max_speed or max(1, size // 16)
    bg = _background(rng, size, world)
    names = list(COLOURS)
    objs = []
    for _ in range(num_shapes):
        if world == "simple":  # larger shapes: several backbone patches across
            r = int(rng.integers(max(2, size // 7), max(3, size // 4) + 1))
        else:
            r = int(rng.integers(max(2, size // 10), max(3, size // 5) + 1))
        objs.append({
            "class": CLASSES[int(rng.integers(len(CLASSES)))],
            "colour_name": names[int(rng.integers(len(names)))],
            "size": r,
            "depth": float(rng.uniform(0.2, 0.9)),
            "pos": rng.integers(r, size - r, 2).astype(np.int64),
            "vel": rng.integers(-max_speed, max_speed + 1, 2).astype(np.int64),
            "stripe": float(rng.uniform(0.5, 1.5)),
        })
        if not objs[-1]["vel"].any():
            objs[-1]["vel"][int(rng.integers(2))] = 1
    g = int(round(gravity))
    order = sorted(range(num_shapes), key=lambda i: -objs[i]["depth"])  # far to near
    yy, xx = np.mgrid[0:size, 0:size]

    # positions per frame (integer), with bounces and gravity
    positions, velocities = _simulate(objs, frames * stride, g, lambda o: (o["size"], size - 1 - o["size"]))
    positions, velocities = positions[::stride], velocities[::stride]

    out = {k: [] for k in ("frames", "ids", "depth", "skeleton")}
    for t in range(frames):
        img = bg.copy()
        ids = np.full((size, size), -1, np.int64)
        depth = np.ones((size, size), np.float32)
        centres, corners = [], []
        for i in order:
            o = objs[i]
            cx, cy = positions[t, i]
            _paint(img, ids, depth, o, i, xx - cx, yy - cy, o["size"], world)
            r = o["size"]
            centres.append((cx, cy))
            corners += [(cx - r, cy - r), (cx + r, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
        out["frames"].append(np.clip(img, 0, 255).round().astype(np.uint8))
        out["ids"].append(ids)
        out["depth"].append(depth)
        out["skeleton"].append(np.stack([_gauss(size, centres), _gauss(size, corners)]))

    ids = np.stack(out["ids"])
    disp = positions[1:] - positions[:-1]  # (T-1, K, 2) true displacement, bounces included
    flow = np.zeros((frames - 1, size, size, 2), np.float32)
    flow_bwd = np.zeros_like(flow)
    occ = np.zeros((frames - 1, size, size), np.uint8)
    for t in range(frames - 1):
        occ[t] = _pair_flow(ids[t], ids[t + 1], disp[t], flow[t], flow_bwd[t])

    state = {"size": size, "frames": frames, "gravity": g, "objects": _objects_state(objs),
             "position": positions.tolist(), "velocity": velocities.tolist()}
    if stride > 1:
        state["stride"] = stride
    caption = _caption(objs, g, world)
    return {
        "frames": np.stack(out["frames"]), "flow": flow, "flow_bwd": flow_bwd, "occ": occ,
        "depth": np.stack(out["depth"]).astype(np.float16), "skeleton": np.stack(out["skeleton"]).astype(np.float16),
        "static": (ids.max(0) < 0).astype(np.uint8), "state": state, "txt": caption,
    }
