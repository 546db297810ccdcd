"""
What a generator has learned of motion, measured two ways (docs/motion.md reports both).

The probe (`motion_probe`) reads the generator's predictions on held-out codes. In a video most
codes repeat the code at their place one latent frame before; those that do not are where things
move (in the Animals world, mostly the ground that scrolls under a running subject). The masked-code
loss and top-1 accuracy are reported apart for moved and still codes, under training's random masks
and under a continuation's mask (the first half of the latent frames given, the rest to fill, as
every shifted window starts). A generator that copies the frame before scores well on still codes
and badly on moved ones.

The continuation test (`continuation`) gives real Animals clips of each action as context and judges
the action of the frames the generator makes after them: the sampler is then not the question, only
whether the generator carries on the motion it is shown.

    codes (N, t, h, w), captions  ->  motion_probe  ->  {probe_<random|next>_<moved|still>_<loss|acc>}
    rendered clips (B, 3, 11, H, W)  ->  make_video  ->  judge per window  ->  {continue_<action>}

evaluate.py reports both (and `--motion SEED` alone, for the study); train.py logs them at
image_every.

Stage 1 has its own question (`code_following`): whether a tokenizer's codes move with the picture.
Where they do, continuing a scroll is copying codes from one place along, which relative positions
make easy to attend to; where they do not, the generator has to learn the scroll as a mapping from
codes to new codes.
"""

import numpy as np
import torch
import torch.nn.functional as F

from maskgit import make_video
from worlds import animals

# Legend: B batch, t h w latent grid, K codebook size, L text length, N clips.


@torch.no_grad()
def motion_probe(model, codes: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, seed: int = 0,
                 batch_size: int = 32) -> dict[str, float]:
    """What the generator has learned of motion, from held-out codes (N, t, h, w) and captions
    (N, L): the masked-code loss and top-1 accuracy on codes that differ from the code at their
    place one latent frame before (moved) and on those that repeat it (still), latent frames 1..
    only, under two masks: training's random ones (probe_random_*, the same draws every call, from
    `seed`) and a continuation's (probe_next_*: the first half of the latent frames given, the rest
    to fill, as a shifted window starts). A model that copies the frame before scores well on still
    codes and badly on moved ones."""
    t = codes.shape[1]
    moved = codes[:, 1:] != codes[:, :-1]  # (N, t - 1, h, w): frame 0 has no frame before
    sums = {}
    counts = {}
    with torch.random.fork_rng(devices=[codes.device] if codes.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for kind in ("random", "next"):
            for i in range(0, len(codes), batch_size):
                c = codes[i:i + batch_size]
                rows = slice(i, i + batch_size)
                if kind == "random":
                    tokens, masked = model.mask_positions(c)
                    masked = masked.view(c.shape)
                else:
                    masked = torch.zeros_like(c, dtype=torch.bool)
                    # keep t // 2 latent frames, as make_video's default context
                    masked[:, t // 2:] = True
                    # [MASK]
                    tokens = c.masked_fill(masked, model.config.codebook_size)
                # (B, t, h, w, K)
                logits = model.predict(tokens, ids[rows].to(c.device), mask[rows].to(c.device)).float()
                ce = F.cross_entropy(logits.flatten(0, 3), c.flatten(),
                                     reduction="none").view(c.shape)[:, 1:]
                hit = (logits.argmax(-1) == c)[:, 1:]  # (B, t - 1, h, w)
                for group, where in (("moved", moved[rows]), ("still", ~moved[rows])):
                    # scored: masked positions of this group
                    where = where & masked[:, 1:]
                    counts[kind, group] = counts.get((kind, group), 0) + where.sum().item()
                    for name, value in (("loss", ce), ("acc", hit.float())):
                        key = (kind, group, name)
                        sums[key] = sums.get(key, 0.0) + value[where].sum().item()
    figures = {}
    for (kind, group, name), total in sums.items():
        figures[f"probe_{kind}_{group}_{name}"] = total / max(counts[kind, group], 1)
    return figures


# the real clips the continuation test gives as context: never trained on
CONTINUE_SEED = 1_000_033


@torch.no_grad()
def continuation(model, text, tokenizer, clips_per_action: int = 2, windows: int = 3,
                 seed: int = CONTINUE_SEED, device: torch.device = torch.device("cpu"),
                 **sampling) -> dict[str, float]:
    """Real Animals clips as context, the generator goes on: for each action, `clips_per_action`
    rendered 11-frame clips (random species that has it, colour, direction, scene) are continued
    under their canonical caption by `windows` windows of 10 new frames, and each window is judged.
    -> continue_action, the share of windows whose action is the clip's, and continue_<action> for
    each action."""
    rng = np.random.default_rng(seed)
    specs = []
    for action in animals.MOTION:
        for _ in range(clips_per_action):
            species = str(rng.choice([s for s in animals.SPECIES if action in animals.ACTIONS[s]]))
            specs.append(animals.AnimalSpec(species, str(rng.choice(list(animals.COLORS))), action,
                                            str(rng.choice(animals.DIRECTIONS)),
                                            str(rng.choice(list(animals.SCENES)))))
    real = np.stack([animals.render(s, 11, 64, rng) for s in specs])  # (B, 11, H, W, 3) uint8
    # (B, 3, 11, H, W)
    init = torch.from_numpy(real).permute(0, 4, 1, 2, 3).to(device).float() / 127.5 - 1
    prompt = [x.to(device) for x in text.encode([animals.caption(s) for s in specs],
                                                model.config.text.max_len)]
    # (B, 3, 11 + 10w, H, W)
    video = make_video(model, tokenizer, [prompt], [10 * windows], init=init, **sampling)
    video = video.float().cpu()
    held = {a: [] for a in animals.MOTION}
    for v, s in zip(video, specs):
        held[s.action] += [animals.judge(v[:, 11 + 10 * i:21 + 10 * i])["action"] == s.action for i in range(windows)]
    return {"continue_action": float(np.mean(sum(held.values(), [])))} | {
        f"continue_{a}": float(np.mean(h)) for a, h in held.items()}


def _slide(image: np.ndarray, speed: float, frames: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (T, H, W, 3): frame i is the image moved left by speed * i pixels (wrapped
    round, fractions by linear interpolation, as the Animals ground scrolls)."""
    out = []
    for i in range(frames):
        k = int(np.floor(speed * i))
        f = speed * i - np.floor(speed * i)
        out.append(np.roll(image, -k, axis=1) * (1 - f) + np.roll(image, -k - 1, axis=1) * f)
    return np.round(np.stack(out)).astype(np.uint8)  # (T, H, W, 3)


def _codes(tokenizer, videos: np.ndarray) -> torch.Tensor:
    """Videos (N, T, H, W, 3) uint8 -> their codes (N, t, h, w)."""
    return tokenizer.encode(torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1)


def _following(codes: torch.Tensor, d: int) -> float:
    """The share of bottom-row codes (latent frames 2.., inner columns) of codes (N, t, h, w) that
    repeat the code d places to the right one latent frame before: where a picture moving left by d
    codes came from."""
    # (N, t, w): the bottom code row, below every subject's feet
    bottom = codes[:, :, -1]
    w = codes.shape[-1]
    # frame 0 is coded alone, so from 2
    now = bottom[:, 2:, 1:w - 1 - d]
    before = bottom[:, 1:-1, 1 + d:w - 1]
    return (now == before).float().mean().item()


@torch.no_grad()
def code_following(tokenizer, clips: int = 64, seed: int = CONTINUE_SEED) -> dict[str, float]:
    """Whether a tokenizer's codes move with the picture (README, "do the tokenizer's codes follow
    the ground?"). On `clips` rendered Animals clips of a subject running right: follow_real, the
    share of bottom-row codes that repeat the code one latent frame before at the place the ground
    came from; follow_slid, the same on each clip's first frame slid whole at the clip's speed (a
    pure translation: what the tokenizer allows); follow_grid, slid by one code a latent frame (4
    pixels a frame at 8 pixels a code); and nonlocal, the share of codes in the far quadrant that
    change when the top-left 8 x 8 pixels of frames 3.. are inverted (a code that follows only its
    own cell changes none)."""
    rng = np.random.default_rng(seed)
    specs = []
    while len(specs) < clips:
        spec = animals.random_spec(rng)
        if spec.species != "bird":
            # a bird's ground does not scroll while it sits
            specs.append(animals.AnimalSpec(spec.species, spec.color, "running", "right",
                                            spec.scene))
    real = np.stack([animals.render(s, 11, 64, rng) for s in specs])  # (N, 11, 64, 64, 3)
    # each clip's pace is 0.9 to 1.1 of it
    speed = animals.MOTION["running"][0]
    inverted = real.copy()
    inverted[:, 3:, :8, :8] = 255 - inverted[:, 3:, :8, :8]
    a, b = _codes(tokenizer, np.concatenate([real, inverted])).chunk(2)  # (N, t, h, w) each
    t, h, w = a.shape[1:]
    # code places moved in a latent frame
    run, grid = (round(v * 10 / (t - 1) / (64 // w)) for v in (speed, 4.0))
    # the first frame of each clip slid at the running speed, and at a whole code a latent frame
    slid = _codes(tokenizer, np.stack([_slide(v[0], speed, 11) for v in real]))
    on_grid = _codes(tokenizer, np.stack([_slide(v[0], 4.0, 11) for v in real]))
    # codes of the far quadrant that change when only the pixels of the near corner do
    far = a[:, 2:, h // 2:, w // 2:] != b[:, 2:, h // 2:, w // 2:]
    return {"follow_real": _following(a, run),
            "follow_slid": _following(slid, run),
            "follow_grid": _following(on_grid, grid),
            "nonlocal": far.float().mean().item()}


def watch_motion(model, text, tokenizer, held_out: tuple, data: str, device: torch.device,
                 seed: int, **sampling) -> dict[str, float]:
    """What a run logs of motion at each image_every: the probe on its held-out (codes, ids, mask)
    and, in the Animals world, one real clip of each action continued by two windows."""
    figures = motion_probe(model, *held_out, seed=seed)
    if data == "animals":
        figures |= continuation(model, text, tokenizer, 1, 2, device=device, **sampling)
    return figures
