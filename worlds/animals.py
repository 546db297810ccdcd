"""
The Animals world: a procedural text-to-video world of animals acting in scenes, with a judge that reads
the attributes back from pixels; what `python sample.py "a dog running"` is trained on.

Each clip shows one subject (dog, cat, horse or bird; brown, black, white, grey or orange) side-on,
running, walking, jumping or sitting (the bird flies or sits), facing left or right, on the grass,
on the beach, in the snow or at night: a sky over a ground with a little life (tufts that sway, wave
crests, falling snow, twinkling stars). The subject is a sprite of tapered capsules drawn from their
distance field (anti-aliased without supersampling) in a one-pixel outline: dark by day, so that a
white dog shows on snow, and a pale moonlit rim at night, so that a black cat shows in the dark.

Camera rule, which keeps a video of any length meaningful: the camera follows the subject, as in a
tracking shot. The subject stays at the horizontal centre and the ground scrolls against its travel
at its speed, so a 241-frame "dog running to the right" shows a running dog throughout; the sky is
at infinity and stays. The motion is on the tokenizer's grid: a ground mark stands every 24 pixels
of the world and a clip starts on a whole 8-pixel cell, so a running ground moves by one code a
latent frame (scattered marks at off-grid speeds left the generator's subjects standing:
docs/motion.md). A story (`start_action`, `switch_at`) changes action mid-clip and keeps the rest.

AnimalSpec  ->  render  ->  video (T, H, W, 3) uint8  ->  judge  ->  {attribute: value read back}
Source:     clip k  ->  (video (T, H, W, 3) uint8, caption str)

The judge reads what the renderer guarantees: the scene from the top (sky) and bottom (ground) rows;
the subject as the pixels far from their row's background (the median of the outer fifths, which the
camera rule keeps clear), the largest blob with its holes filled; species from its area; colour from
its inside; travel from the shift that best aligns the ground band below the feet two frames apart
(marks moving left: travel right); a jump from a take-off; flying from being in the sky; the facing
of a subject that does not travel from the side its head (top third) is on. Deviations: Phenaki
trains on web video; this world stands in so that the default model can be trained and judged on two
CPU cores.
"""

import argparse
import re
import time
from dataclasses import dataclass

import numpy as np

from media.video import read_video, to_uint8_frames
from worlds import sprites
from worlds.shapes import _components, _grow, _solid
from worlds.sprites import OUTLINE, RIM, capsule_distance, draw_subject

# Legend: T frames, H W pixels, k clip, q pixels per unit (1 at 64 x 64); points x + iy, y down.

SPECIES = ("dog", "cat", "horse", "bird")
COLORS = {"brown": (125, 80, 45), "black": (30, 30, 30), "white": (245, 245, 245),
          "grey": (135, 135, 135), "orange": (235, 135, 40)}
ACTIONS = {s: ("running", "walking", "jumping",
               "sitting") for s in SPECIES[:3]} | {"bird": ("flying", "sitting")}
DIRECTIONS = ("left", "right")
# sky at the top, at the horizon, ground, ground marks; every subject colour stands out on each
# (night is blue)
SCENES = {"on the grass": ((100, 160, 225), (165, 205, 240), (85, 155, 60), (60, 125, 40)),
          "on the beach": ((60, 175, 235), (175, 220, 245), (230, 205, 150), (200, 172, 118)),
          "in the snow": ((150, 160, 180), (200, 205, 218), (222, 230, 242), (190, 200, 225)),
          "at night": ((12, 16, 48), (40, 55, 110), (42, 58, 82), (70, 92, 118))}
# horizon row, top of the sea, feet line, top of the scroll band
HORIZON = 40
SEA = 34
GROUND = 54
BAND = 57
# travel (pixels a frame), gait (cycles a frame), leg swing (radians). A latent frame is two frames:
# in one, running and flying move the ground a whole 8-pixel code, walking and jumping half of one
MOTION = {"running": (4.0, 0.25, 0.6), "walking": (2.0, 0.125, 0.35), "jumping": (2.0, 0.0, 0.1),
          "sitting": (0.0, 0.0, 0.0), "flying": (4.0, 0.25, 0.0)}
MARK_EVERY = 3  # marks stand on every third 8-pixel cell
# hop cycles a frame; share of a hop in the air; flying altitude; a bird's climb and landing, pixels
# a frame: 7 up, 3 down (landing as slowly, "the bird lands" still flew through most of its segment)
HOP = 1 / 7
AIR = 0.75
ALT = 34.0
CLIMB = 5.0
LAND = 12.0
# the judge's area cuts bird | cat | dog | horse, in the gaps measured clean and blurred
AREAS = (107, 222, 390)


@dataclass
class AnimalSpec:
    # one of SPECIES
    species: str
    # a key of COLORS
    color: str
    # one of ACTIONS[species]
    action: str
    # "left" or "right": where it travels and faces
    direction: str
    # a key of SCENES
    scene: str


def random_spec(rng: np.random.Generator) -> AnimalSpec:
    species = str(rng.choice(SPECIES))
    return AnimalSpec(species, str(rng.choice(list(COLORS))), str(rng.choice(ACTIONS[species])),
                      str(rng.choice(DIRECTIONS)), str(rng.choice(list(SCENES))))


VERBS = {"running": "runs", "walking": "walks", "jumping": "jumps", "sitting": "sits",
         "flying": "flies"}
ACROSS = {"on the grass": "across the grass", "on the beach": "along the beach",
          "in the snow": "through the snow", "at night": "in the dark"}
STORY = {"running": "the {} starts running", "walking": "the {} starts walking",
         "jumping": "the {} jumps", "sitting": "the {} sits down", "flying": "the {} flies away"}
# Story clips switch action mid-clip, so a generator of this world has seen an action change after
# the frames before it: at a cut to the next prompt it keeps the whole context
# (maskgit.plan_windows). The last frame alone read the new action in 43% of story segments against
# 60% (50 three-prompt stories).
KEEP_AT_CUT = None
# the words a caption may use for an attribute's value, beside the value itself
WORDS = {"run": "running", "runs": "running", "walk": "walking", "walks": "walking",
         "jump": "jumping", "jumps": "jumping", "sit": "sitting", "sits": "sitting",
         "lands": "sitting", "fly": "flying", "flies": "flying", "grass": "on the grass",
         "beach": "on the beach", "sand": "on the beach", "snow": "in the snow",
         "night": "at night", "dark": "at night", "gray": "grey"}


def _phrase(obj: str, action: str, direction: str | None, scene: str | None) -> str:
    """'a dog running to the right on the grass', 'an orange cat sitting,
    facing left' (the facing last)."""
    obj, where = f"an {obj}" if obj[0] in "aeiou" else f"a {obj}", f" {scene}" if scene else ""
    if action == "sitting":
        return f"{obj} sitting{where}" + (f", facing {direction}" if direction else "")
    return f"{obj} {action}" + (f" to the {direction}" if direction else "") + where


def caption(spec: AnimalSpec) -> str:
    """The canonical caption: 'a brown dog running to the right on the grass', 'a cat
    sitting at night, facing left'."""
    return _phrase(f"{spec.color} {spec.species}", spec.action, spec.direction, spec.scene)


def training_caption(spec: AnimalSpec, rng: np.random.Generator) -> str:
    """Full (30%), short (45%: what people type, each optional attribute stated a third of
    the time) or a paraphrase (25%), so that the text encoder reads the words and the
    renderer fills in the rest."""
    u, keep = rng.random(), rng.random(3) < 1 / 3
    if u < 0.3:
        return caption(spec)
    obj = f"{spec.color} {spec.species}" if keep[0] else spec.species
    if u < 0.75:
        return _phrase(obj, spec.action, spec.direction if keep[1] else None,
                       spec.scene if keep[2] else None)
    side = f", facing {spec.direction}" if spec.action == "sitting" else f" {spec.direction}"
    # 'a dog running'
    short = _phrase(obj, spec.action, None, None)
    forms = [short.replace(spec.action, VERBS[spec.action]),
             f"the {obj} is {spec.action} {ACROSS[spec.scene]}", short + side]
    return forms[int(rng.integers(len(forms)))]


def story_caption(spec: AnimalSpec) -> str:
    """How a story goes on into spec.action: 'the dog jumps', 'the bird
    flies away', 'the bird lands'."""
    return STORY[spec.action].format(spec.species).replace("bird sits down", "bird lands")


def parse(text: str) -> dict[str, str]:
    """The attributes a caption states: {species, color, action, direction,
    scene}, missing ones absent."""
    words = [WORDS.get(w, w) for w in re.findall(r"[a-z]+", text.lower())]
    vocabulary = {"species": SPECIES, "color": COLORS, "action": MOTION, "direction": DIRECTIONS,
                  "scene": SCENES}
    found = {key: next((w for w in words if w in values), None) for key, values in vocabulary.items()}
    return {key: value for key, value in found.items() if value}


def _track(spec: AnimalSpec, frames: int, rng: np.random.Generator, start_action,
           switch_at) -> dict:
    """The subject's state (T,) each: camera x in the world, gait phase, leg swing, gallop, hop
    height and leg stretch, sit, altitude, tail wag. A hop lands first; sitting, rising or landing
    takes 3 frames, climbing 7."""
    sign = 1 if spec.direction == "right" else -1
    # on a whole cell, far from the world's origin
    cam = 8.0 * rng.integers(1250, 12500)
    phase = rng.random()
    u = rng.random()
    height = rng.uniform(8, 10)
    wag = rng.random()
    prev, bird = start_action or spec.action, spec.species == "bird"
    u = u * (prev == "jumping")
    sit = float(prev == "sitting")
    alt = ALT * (prev == "flying")
    rows = []
    for t in range(frames):
        a = start_action if start_action and t < switch_at else spec.action
        if (a == "jumping" and prev != "jumping") or (a != "jumping" and u >= AIR):
            # u: the hop, aloft below AIR
            # a hop starts from the ground; a subject that stops jumping stays there
            u = 0.0
        if a != "jumping" and prev == "jumping" and u < AIR / 2:
            # one still rising turns down at once (u -> AIR - u, the same height): after "the dog
            # starts running" it lands and runs, and never leaps again
            u = AIR - u
        air = np.sin(np.pi * u / AIR) if u < AIR else 0.0
        sit += 0.0 if bird else np.clip(float(a == "sitting") - sit, -0.34, 0.34)
        alt += np.clip(ALT * (a == "flying") - alt, -LAND, CLIMB) if bird else 0.0
        travel, gait, swing = MOTION[a]
        rows.append((cam, phase, swing, a == "running", height * air, air, sit, alt, wag))
        cam += sign * (MOTION["flying"][0] * alt / ALT if bird else travel * (1 - sit))
        phase += MOTION["flying"][1] * (alt > 0) if bird else gait
        u = (u + HOP) % 1 if a == "jumping" or 0 < u < AIR else u
        wag, prev = wag + 0.15 + 0.1 * sit, a
    return dict(zip(("cam", "phase", "swing", "run", "hop", "air", "sit", "alt", "wag"),
                    np.array(rows, float).T))


def _hash(seed: int, cells: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1), a fixed function of (seed, cell, salt) by splitmix64: scenery at a place."""
    h = cells.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64((seed * 1000003 + salt) % 2 ** 63)
    for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        h = (h ^ (h >> np.uint64(shift))) * np.uint64(mul)
    return (h >> np.uint64(11)).astype(np.float64) / 2.0 ** 53


def _backdrop(scene: str, size: int) -> np.ndarray:
    """The still scene (H, W, 3) float: a sky graded to the horizon over a flat ground,
    on the beach a sea between."""
    top, low, ground, _ = (np.array(c, np.float32) for c in SCENES[scene])
    y = (np.arange(size) + 0.5) / size * 64
    rows = np.where((y < HORIZON)[:, None], top + y[:, None] / HORIZON * (low - top), ground)  # (H, 3)
    rows[(y >= SEA) & (y < HORIZON) & (scene == "on the beach")] = (45, 115, 185)
    return np.repeat(rows[:, None], size, axis=1)  # (H, W, 3)


def _ground(scene: str, cam: np.ndarray, size: int, sway: float) -> np.ndarray:
    """Mark coverage (T, Hg, W) of the ground rows around cam[t]. Every third 8-pixel cell holds a
    mark at its centre: in the scroll band, for the judge to follow, or one cell on, above it,
    faint enough to touch the subject, swaying."""
    q, lo = size / 64, int(np.floor(cam.min() - 40))
    # world x of each strip column
    xw = lo + (np.arange(int((cam.max() + 40 - lo) * q)) + 0.5) / q
    yw = HORIZON + (np.arange(size - int(HORIZON * q)) + 0.5) / q + (int(HORIZON * q) - HORIZON * q) / q
    p, cell = xw[None, :] + 1j * yw[:, None], np.floor(xw / 8).astype(np.int64)  # (Hg, Ws), (Ws,)
    # two blades leaning apart; elsewhere a pebble
    tuft = scene in ("on the grass", "at night")
    shape = [(-1 - 2.5j, 0.5, 0.2), (1 - 2.5j, 0.5, 0.2)] if tuft else [(-0.9, 0.8, 0.6), (0.9, 0.8, 0.6)]
    strip = np.zeros(p.shape, np.float32)
    # the band's marks: 2.2 times as thick and 2.5 times the contrast of the faint ones above, so
    # that a tokenizer keeps them (at the faint ones' size and contrast a 64 x 64 VQGAN reconstructs
    # a flat ground)
    for m, (y_lo, y_hi, weight,
            lean) in enumerate(((BAND + 4, 62, 2.5, 0.0), (HORIZON + 3, BAND - 1, 0.5, sway))):
        # (Ws,); absent marks lie far away
        base = cell * 8 + 4.0 + 1j * np.where(cell % MARK_EVERY == m, (y_lo + y_hi) / 2, -99)
        k = 2.2 if m == 0 else 1.0
        caps = [(base, base + dx + lean * tuft, k * r0, k * r1) for dx, r0, r1 in shape]
        strip = np.maximum(strip, weight * np.clip(0.5 - capsule_distance(p, caps) * q, 0, 1))
    # strip column under screen column 0, per frame
    c = (cam - lo) * q - size / 2 - 0.5
    cols = c[:, None] + np.arange(size)[None, :]  # (T, W)
    i, f = np.floor(cols).astype(int), (cols - np.floor(cols))[:, None, :]
    return strip[:, i].transpose(1, 0, 2) * (1 - f) + strip[:, i + 1].transpose(1, 0, 2) * f  # (T, Hg, W)


def _scenery(scene: str, frames: int, size: int, seed: int, cam: np.ndarray) -> np.ndarray:
    """The background (T, H, W, 3) float: backdrop, scrolling ground marks, and the scene's life."""
    video, q = np.repeat(_backdrop(scene, size)[None], frames, axis=0), size / 64
    # the grass sways in the wind, all of it together
    sway = 0.5 * (scene == "on the grass")
    wind = np.sin(2 * np.pi * (np.arange(frames) / 8 + _hash(seed, np.arange(1), 9)))[:, None, None] > 0
    cover = np.where(wind, _ground(scene, cam, size, sway), _ground(scene, cam, size, -sway))
    ground = video[:, int(HORIZON * q):]
    ground += cover[..., None] * (np.array(SCENES[scene][3], np.float32) - ground)
    t, n = np.arange(frames)[:, None], np.arange(12)
    x0, y0, ph, v = (_hash(seed, n, 20 + j) for j in range(4))  # (12,) each
    twinkle = 0.3 + 0.4 * np.sin(2 * np.pi * (t / (4 + 6 * v) + ph)) ** 2  # (T, 12); dim, to be cheap to encode
    crest = 0.8 * np.clip(np.sin(2 * np.pi * (t / 10 + ph)), 0, 1)
    # (x, y, colour, opacity), each broadcast to (T, 12): stars one to a cell of a 6 x 2 grid, so
    # that no two blur into one; flakes that fall and drift; wave crests, too faint for the judge
    dots = []
    if scene == "at night":
        xs = (n % 6 * 64 / 6 + 2 + 6 * x0) * q
        ys = (2 + n // 6 * 14 + 11 * y0) * q
        dots = [(xs, ys, (255, 245, 200), twinkle)]
    elif scene == "in the snow":
        xs = x0 * size + q * np.sin(t / 2 + 6 * ph)
        ys = (y0 * BAND + (0.5 + 0.6 * v) * t) % BAND * q
        dots = [(xs, ys, (255, 255, 255), 0.9)]
    elif scene == "on the beach":
        ys = (SEA + 1 + y0 * (HORIZON - SEA - 2)) * q
        dots = [((x0 * 64 + 0.3 * t + dx) * q, ys, (70, 140, 205), crest) for dx in range(3)]
    for xs, ys, color, alpha in dots:
        # one-pixel dots at (T, N) positions, blended in
        xs, ys, alpha, tt = np.broadcast_arrays(xs, ys, alpha, t)
        xs, ys = np.round(xs).astype(int) % size, np.clip(np.round(ys).astype(int), 0, size - 1)
        video[tt, ys, xs] += alpha[..., None] * (np.array(color, np.float32) - video[tt, ys, xs])
    return video


def render(spec: AnimalSpec, frames: int, size: int, rng: np.random.Generator,
           start_action: str | None = None, switch_at: int | None = None) -> np.ndarray:
    """One clip (T, H, W, 3) uint8, a fixed function of spec and rng; frames a:b of a longer one
    continue its frames 0:a. A story starts in `start_action`, switches to spec.action at frame
    `switch_at`, keeps the rest."""
    tr = _track(spec, frames, rng, start_action, switch_at)
    video = _scenery(spec.scene, frames, size, int(rng.integers(2 ** 31)), tr["cam"])
    draw_subject(video, spec, tr, COLORS[spec.color], GROUND)
    return np.clip(np.round(video), 0, 255).astype(np.uint8)


def _scroll(frames: np.ndarray) -> np.ndarray:
    """The ground's shift per frame (T - s,) at 64 x 64, frame t to t + s, that best aligns the band
    below the feet, to a fraction of a pixel; NaN where the band has no marks. s = 2: a tokenizer
    coding frames in pairs may move the ground once per pair (0, then 7 pixels, for a run of 3.5 a
    frame), which two frames average out."""
    T = len(frames)
    W = frames.shape[2]
    q = frames.shape[2] / 64
    s = 2 if T >= 3 else 1
    band, m = frames[:, int(np.ceil((BAND + 1) * q)):].mean(axis=-1), int(np.ceil(5 * s * q))  # (T, hb, W); m > travel
    err = np.stack([np.abs(band[s:, :, max(d, 0):W + min(d, 0)] - band[:-s, :, max(-d, 0):W - max(d, 0)]).mean(
        axis=(1, 2)) for d in range(-m, m + 1)], axis=1)  # (T - s, 2m + 1): frame t + s is frame t moved by d
    i = np.clip(err.argmin(axis=1), 1, 2 * m - 1)
    lo, mid, hi = (err[np.arange(T - s), i + j] for j in (-1, 0, 1))
    # parabola's vertex
    shift = i - m + np.clip(0.5 * (lo - hi) / np.maximum(lo - 2 * mid + hi, 1e-6), -0.5, 0.5)
    return np.where(err.max(axis=1) - err.min(axis=1) > 0.5, shift / q / s, np.nan)


def judge(video) -> dict:
    """Species, color, action, direction, scene of an Animals clip (an array, a tensor as
    to_uint8_frames takes, or a path), whether one subject shows in every frame (and in what share),
    its area and travel (pixels a frame)."""
    f = to_uint8_frames(read_video(video) if isinstance(video, str) else video).astype(np.float32)  # (T, H, W, 3)
    (T, H, W, _), q = f.shape, f.shape[2] / 64
    # sky, ground
    seen = np.concatenate([f[:, :2].mean(axis=(0, 1, 2)), f[:, -2:].mean(axis=(0, 1, 2))])
    scene = min(SCENES, key=lambda s: np.abs(seen - np.array(SCENES[s][0] + SCENES[s][2])).sum())
    rows = np.median(np.concatenate([f[:, :, :W // 5], f[:, :, -(W // 5):]], axis=2), axis=2,
                     keepdims=True)
    far = np.abs(f - rows).sum(axis=-1) > 60  # (T, H, W): not background (faint marks differ by < 50)
    # below the feet lies only ground, with the strong marks of the band
    far[:, int(BAND * q):] = False
    # joins the outline to the body where blur mixed them into a background-like colour
    far = _grow(far)
    one = []
    areas = []
    bottoms = []
    leans = []
    inside = []
    for t in range(T):
        # smaller: stars, flakes, crests
        blobs = [c for c in _components(far[t]) if len(c) >= 30 * q * q]
        one.append(len(blobs) == 1)
        if blobs:
            blob = _solid(np.isin(np.arange(H * W), max(blobs, key=len)).reshape(H, W))
            ys, xs = np.nonzero(blob)
            areas.append(len(ys) / q ** 2)
            bottoms.append(ys.max() / q)
            # the head leads
            leans.append(xs[ys < ys.min() + (ys.max() - ys.min()) / 3].mean() - xs.mean())
            for _ in range(2):
                # less the outline and what blur mixed into the body, if enough is left
                blob = core if (core := ~_grow(~blob)).sum() >= 4 else blob
            inside.append(f[t][blob])
    if not areas:
        return dict.fromkeys(("species", "color", "action", "direction", "area", "travel")) | {
            "scene": scene, "one_subject": False, "one_share": 0.0}
    inside, palette = np.concatenate(inside), np.array(list(COLORS.values()))  # (N, 3), (5, 3)
    # blur mixes the outline into the body along a line: unless the body is black, read the pixels
    # least mixed
    if list(COLORS)[((palette - np.median(inside, axis=0)) ** 2).sum(axis=1).argmin()] != "black":
        away = np.abs(inside - np.array(RIM if scene == "at night" else OUTLINE)).sum(axis=1)
        inside = inside[away >= np.median(away)]
    color = list(COLORS)[((palette - np.median(inside, axis=0)) ** 2).sum(axis=1).argmin()]
    # bird < cat < dog < horse
    area = float(np.median(areas))
    species, shift = ("bird", "cat", "dog", "horse")[int(np.searchsorted(AREAS, area))], _scroll(f)
    # the ground moves against it
    travel = -float(np.nanmedian(shift)) if np.isfinite(shift).any() else 0.0
    # y down
    rise = float(np.max(np.maximum.accumulate(bottoms)[:-1] - np.array(bottoms[1:]), initial=0.0))
    # in the sky it flies; without travel it sits; taking off (its feet rising above where they
    # were: a hop that only lands, begun before a switch to running, is none) it jumps; fast it runs
    if np.median(bottoms) < HORIZON - 6:
        action = "flying"
    elif abs(travel) < 0.5:
        action = "sitting"
    elif rise > 4:
        action = "jumping"
    # between walking's 2 and running's 4 pixels a frame
    elif abs(travel) > 3.0:
        action = "running"
    else:
        action = "walking"
    facing = travel if abs(travel) >= 0.5 else np.mean(leans)
    return {"species": species, "color": color, "action": action,
            "direction": "right" if facing > 0 else "left", "scene": scene, "one_subject": all(one),
            "one_share": float(np.mean(one)), "area": area, "travel": travel}


def agreement(video, spec: AnimalSpec) -> dict[str, bool]:
    """Does the video show what `spec` says? The judge's verdict per attribute, and one_subject."""
    seen = judge(video)
    return {a: seen[a] == getattr(spec, a) for a in ("species", "color", "action", "direction", "scene")} | {
        "one_subject": seen["one_subject"]}


# what makes this world's clips, for stage 2's cache key (stream.content_digest)
CODE_FILES = (__file__, sprites.__file__)


class AnimalsSource:
    """Clip k of the Animals world, from a generator seeded by (seed, k), like ShapesSource. A
    share `stories` switches action early and is captioned with the story form of its last
    action ('the dog jumps')."""

    def __init__(self, frames: int = 11, size: int = 64, seed: int = 0, stories: float = 0.25):
        self.frames = frames
        self.size = size
        self.seed = seed
        self.stories = stories
        self.name = "animals"

    def __len__(self) -> int:
        # the world has no end
        return 2 ** 62

    def load(self, k: int) -> tuple[np.ndarray, str]:
        rng = np.random.default_rng([self.seed, k])
        spec = random_spec(rng)
        if self.frames >= 5 and rng.random() < self.stories:
            # half the clip or more shows the new action
            start = str(rng.choice([a for a in ACTIONS[spec.species] if a != spec.action]))
            switch = int(rng.integers(2, self.frames // 2 + 2))
            return render(spec, self.frames, self.size, rng, start, switch), story_caption(spec)
        return render(spec, self.frames, self.size, rng), training_caption(spec, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description="Validate the Animals judge on fresh renders of the world.")
    parser.add_argument("command", choices=("validate",))
    parser.add_argument("--clips", type=int, default=500, help="how many fresh clips")
    parser.add_argument("--seed", type=int, default=20_240_613, help="a seed no training run uses")
    args = parser.parse_args()
    hits, spent = {}, 0.0
    for i in range(args.clips):
        rng = np.random.default_rng([args.seed, i])
        start, spec = time.perf_counter(), random_spec(rng)
        video = render(spec, 11, 64, rng)
        spent += time.perf_counter() - start
        hits = {key: hits.get(key, 0) + ok for key, ok in agreement(video, spec).items()}
    print("\n".join(f"{key}: {hit / args.clips:.3f}" for key, hit in hits.items()))
    print(f"render_ms: {1000 * spent / args.clips:.2f}")


if __name__ == "__main__":
    main()
