"""
The Shapes world: a procedural text-to-video data set with an oracle, the embedded default of both
stages, so that everything trains and is measured on a fresh machine with no download.

Each clip shows one object (circle, square or triangle; seven colours; small or large) moving left,
right, up or down, or standing still, on a black 64 x 64 canvas, with a caption such as "a red
circle moving right". `render_shapes` draws a ShapeSpec, keeping the object on the canvas for the
whole clip; `caption` gives the canonical caption and `paraphrase` a training caption, sometimes
reworded, so that the text encoder reads the words rather than memorising one template.
`ShapesSource` is the world as a data source (data.py): clip k is rendered from a generator seeded
by (seed, k), so the same k always gives the same clip, in any worker and after any resume, and the
world has no end.

The oracle reads colour, shape, size and direction back from pixels (the connected components of the
lit pixels; the blob's hue, how it fills its box, where its pixels lie, and the path of its centre),
which turns "does the video match the text?" into a number: `agreement` gives one verdict per
attribute (evaluate.py, and train.py's stage-2 samples).

ShapeSpec  ->  render_shapes  ->  video (T, H, W, 3) uint8  ->  oracle  ->  {attribute: value read
back} Source:    clip k  ->  (video (T, H, W, 3) uint8, caption str)

Deviations: the paper trains on licensed web video; here the Shapes world stands in by default.
Object edges are anti-aliased by 4x supersampling so that positions between pixels are visible.
"""

from dataclasses import dataclass

import numpy as np

from media.video import read_video, to_uint8_frames

# Legend: T frames, H W pixels, k global clip index.

COLORS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "cyan": (0, 255, 255), "magenta": (255, 0, 255), "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
# pixels across on the 64 x 64 canvas
SIZES = {"small": 10, "large": 18}
DIRECTIONS = ("left", "right", "up", "down", "still")
# share of moving objects that enter or leave the canvas in a training clip
EDGES = 0.1
# A clip never changes its motion, so a generator of this world has not learnt to turn it around: at
# a cut to the next prompt of a story it is given the last frame alone (maskgit.plan_windows)
KEEP_AT_CUT = 1
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


@dataclass
class ShapeSpec:
    # a key of COLORS
    color: str
    # one of SHAPES
    shape: str
    # "small" or "large"
    size: str
    # one of DIRECTIONS
    direction: str


def random_spec(rng: np.random.Generator) -> ShapeSpec:
    return ShapeSpec(str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)),
                     str(rng.choice(list(SIZES))), str(rng.choice(DIRECTIONS)))


def caption(spec: ShapeSpec, with_size: bool = True) -> str:
    """The canonical caption: 'a large red circle moving right' or 'a red circle standing still'."""
    size = f"{spec.size} " if with_size else ""
    if spec.direction == "still":
        return f"a {size}{spec.color} {spec.shape} standing still"
    return f"a {size}{spec.color} {spec.shape} moving {spec.direction}"


def paraphrase(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """A training caption: canonical most of the time, otherwise one of a few rewordings, so the
    text encoder has to read the words rather than memorise one template."""
    size = f"{spec.size} " if rng.random() < 0.5 else ""
    obj, d = f"{size}{spec.color} {spec.shape}", spec.direction
    if rng.random() < 0.6:
        return caption(spec, with_size=bool(size))
    if d == "still":
        forms = [f"a {obj} that does not move", f"{obj}, not moving", f"a {obj} staying in place"]
    else:
        adverb = {"left": "to the left", "right": "to the right", "up": "upwards",
                  "down": "downwards"}[d]
        forms = [f"a {obj} goes {d}", f"{obj}, moving {adverb}", f"a {obj} sliding {adverb}"]
    return forms[int(rng.integers(len(forms)))]


def render_shapes(spec: ShapeSpec, frames: int, size: int, rng: np.random.Generator,
                  edge: str | None = None) -> np.ndarray:
    """Render one clip (T, H, W, 3) uint8. The speed is 2 to 3 pixels a frame (at 64 x 64). By
    default the object stays on the canvas for the whole clip (slower where a long clip would run
    out of room). A moving object may instead `edge="enter"`: come in across the edge behind it,
    already partly in at the first frame (so an empty canvas is never followed by an entry), or
    `edge="leave"`: go out across the edge ahead of it, partly or wholly gone by the last frame, the
    canvas black after it."""
    scale = size / 64
    extent = SIZES[spec.size] * scale
    r = extent / 2
    dx, dy = _STEP[spec.direction]
    # free travel along the axis of motion, with a 1-pixel margin
    room = size - extent - 2 * scale
    speed = rng.uniform(2, 3) * scale if spec.direction != "still" else 0.0
    if frames > 1 and edge is None:
        speed = min(speed, room / (frames - 1))
    travel = speed * (frames - 1)
    # pick the start so that the whole path fits: along the motion axis only `room - travel` is free
    lo, hi = r + scale, size - r - scale
    cx0, cy0 = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if edge is not None:
        # the start along the motion, counted from the edge the object comes from
        if edge == "enter":
            # partly in: the centre within one radius of the edge
            ahead = rng.uniform(-r + scale, r + scale)
        else:
            # by the last frame the centre is past the far edge's inner radius, maybe gone
            ahead = rng.uniform(size - r, size + r + travel / 2) - travel
        if dx:
            cx0 = ahead if dx > 0 else size - ahead
        if dy:
            cy0 = ahead if dy > 0 else size - ahead
    elif dx:
        cx0 = rng.uniform(lo, hi - travel) if dx > 0 else rng.uniform(lo + travel, hi)
    elif dy:
        cy0 = rng.uniform(lo, hi - travel) if dy > 0 else rng.uniform(lo + travel, hi)
    t = np.arange(frames, dtype=np.float32)
    cx = (cx0 + dx * speed * t)[:, None, None]  # (T, 1, 1)
    cy = (cy0 + dy * speed * t)[:, None, None]
    # supersampling factor for anti-aliased edges
    ss = 4
    coords = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss
    x, y = coords[None, None, :], coords[None, :, None]  # (1, 1, W*ss), (1, H*ss, 1)
    if spec.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif spec.shape == "square":
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    else:
        # an upright triangle: apex at the top, base at the bottom, as wide as it is tall
        # 0 at the apex, 1 at the base
        rel = (y - (cy - r)) / (2 * r)
        inside = (rel >= 0) & (rel <= 1) & (np.abs(x - cx) <= r * rel)
    cover = inside.reshape(frames, size, ss, size, ss).mean(axis=(2, 4))  # (T, H, W) in [0, 1]
    color = np.array(COLORS[spec.color], dtype=np.float32)
    return np.round(cover[..., None] * color).astype(np.uint8)  # (T, H, W, 3)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a 2-D bool mask, as arrays of flat pixel indices."""
    h, w = mask.shape
    seen = ~mask.ravel().copy()
    out = []
    for start in np.flatnonzero(mask.ravel()):
        if seen[start]:
            continue
        seen[start] = True
        stack, comp = [start], []
        while stack:
            p = stack.pop()
            comp.append(p)
            y, x = divmod(p, w)
            for q, ok in ((p - 1, x > 0), (p + 1, x < w - 1), (p - w, y > 0), (p + w, y < h - 1)):
                if ok and not seen[q]:
                    seen[q] = True
                    stack.append(q)
        out.append(np.array(comp))
    return out


def _grow(mask: np.ndarray) -> np.ndarray:
    """A bool mask (..., H, W) grown by one pixel, 4-connected."""
    p = np.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)])
    return mask | p[..., :-2, 1:-1] | p[..., 2:, 1:-1] | p[..., 1:-1, :-2] | p[..., 1:-1, 2:]


def _solid(blob: np.ndarray) -> np.ndarray:
    """A grown blob (H, W) bool, holes filled, shrunk back: whole where only the
    outline shows (white on snow)."""
    ys, xs = np.nonzero(blob)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    wall, outside = np.pad(blob[box], 1), np.pad(np.zeros_like(blob[box]), 1, constant_values=True)
    while (more := _grow(outside) & ~wall).sum() > outside.sum():
        # flood in from the edge of the box
        outside = more
    solid = blob.copy()
    solid[box] = ~outside[1:-1, 1:-1]
    return ~_grow(~solid)


def oracle(video) -> dict:
    """Read colour, shape, size and direction back from a Shapes clip, and whether exactly one
    object is visible in every frame; per frame, how many objects show ("objects") and whether the
    object is cut by the edge ("partial"). Shape and size are read from whole objects only. `video`
    is an array, a tensor (see to_uint8_frames) or a file path."""
    if isinstance(video, str):
        video = read_video(video)
    frames = to_uint8_frames(video)
    T, H, W, _ = frames.shape
    scale = W / 64
    # smaller blobs are noise, not objects
    min_area = 8 * scale * scale
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float32)
    one_object = True
    centres = []
    colours = []
    extents = []
    fills = []
    tops = []
    objects = []
    partial = []
    areas = []
    for f in frames:
        # anything clearly brighter than the black background
        lit = f.max(axis=-1) >= 96
        blobs = [c for c in _components(lit) if len(c) >= min_area]
        one_object &= len(blobs) == 1
        objects.append(len(blobs))
        # the object's pixels, or all lit ones
        areas.append(int(lit.sum()) if len(blobs) != 1 else len(blobs[0]))
        if not blobs:
            partial.append(False)
            continue
        blob = max(blobs, key=len)
        ys, xs = np.divmod(blob, W)
        partial.append(bool(xs.min() == 0 or ys.min() == 0 or xs.max() == W - 1 or ys.max() == H - 1))
        centres.append((xs.mean(), ys.mean()))
        rgb = f.reshape(-1, 3)[blob].astype(np.float32).mean(axis=0)
        # compare hues, not brightness: scale the mean colour so its largest channel is 255
        rgb = rgb * (255 / max(rgb.max(), 1))
        colours.append(names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))])
        if partial[-1]:
            # cut by the edge: its outline says nothing of shape or size
            continue
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        extents.append(max(bw, bh) / scale)
        fills.append(len(blob) / (bw * bh))
        # a triangle has most of its pixels low down
        upper = (ys < (ys.min() + ys.max()) / 2).sum()
        tops.append(upper / max(len(blob) - upper, 1))
    # per frame: blobs seen, whether one touches the edge, and the lit area (fragments below
    # min_area count here)
    census = {"objects": objects, "partial": partial, "areas": areas}
    if not centres:
        return {"color": None, "shape": None, "size": None, "direction": None, "one_object": False,
                "start": None, "end": None} | census
    color = max(set(colours), key=colours.count)
    # unknown when the object is cut by the edge in every frame
    shape = size = None
    if extents:
        # an upright triangle fills half its box and is top-light; a square fills it; a circle pi/4
        if np.median(tops) < 0.6:
            shape = "triangle"
        elif np.median(fills) > 0.9:
            shape = "square"
        else:
            shape = "circle"
        size = "small" if np.median(extents) < 14 else "large"
    (x0, y0), (x1, y1) = centres[0], centres[-1]
    dx, dy = (x1 - x0) / scale, (y1 - y0) / scale
    # pixels a frame at 64 x 64
    moved = max(abs(dx), abs(dy)) / max(len(centres) - 1, 1)
    if moved < 0.7:
        direction = "still"
    elif abs(dx) >= abs(dy):
        direction = "right" if dx > 0 else "left"
    else:
        direction = "down" if dy > 0 else "up"
    return {"color": color, "shape": shape, "size": size, "direction": direction, "one_object": one_object,
            # centres at 64 x 64
            "start": (x0 / scale, y0 / scale), "end": (x1 / scale, y1 / scale)} | census


def agreement(video, spec: ShapeSpec) -> dict[str, bool]:
    """Does the video show what `spec` says? One verdict per attribute, by the oracle."""
    seen = oracle(video)
    return {k: seen[k] == getattr(spec, k) for k in ("color", "shape", "size", "direction")} | {
        "one_object": seen["one_object"]}


class ShapesSource:
    """Clip k of the Shapes world, rendered from a generator seeded by (seed, k): the same k
    always gives the same clip, so a resumed run can start anywhere. The world has no end. An
    `edges` share of the moving objects enter or leave the canvas (half each), under the same
    captions: real videos have things come and go, and it teaches a long video what happens at the
    edge (README, any length)."""

    def __init__(self, frames: int = 11, size: int = 64, seed: int = 0, paraphrases: bool = True,
                 edges: float = EDGES):
        self.frames = frames
        self.size = size
        self.seed = seed
        self.paraphrases = paraphrases
        self.edges = edges
        self.name = "shapes"

    def __len__(self) -> int:
        return 2 ** 62

    def load(self, k: int) -> tuple[np.ndarray, str]:
        rng = np.random.default_rng([self.seed, k])
        spec = random_spec(rng)
        edge = None
        if spec.direction != "still" and rng.random() < self.edges:
            edge = "enter" if rng.random() < 0.5 else "leave"
        video = render_shapes(spec, self.frames, self.size, rng, edge)
        text = paraphrase(spec, rng) if self.paraphrases else caption(spec)
        return video, text
