"""
Judging a generator's videos beyond one clip a prompt, for evaluate.py: prompts sampled in batches
and read back by a world's judge, stories whose prompts change at each cut, long videos made a window
at a time, and the Animals extras (short prompts, "a dog running", a 241-frame video, the share of
each action). evaluate.py's docstring names every figure these return; each is a share of clips,
segments, frames or windows that show what their prompt says.
"""

import dataclasses

import numpy as np
import torch

from maskgit import make_video
from worlds import animals, shapes
from worlds.shapes import DIRECTIONS, ShapeSpec, oracle


@torch.no_grad()
def sample_and_judge(model, text, tokenizer, world, specs: list, device: torch.device, prompts: list[str] | None = None,
                     **sampling) -> tuple[torch.Tensor, list[dict[str, bool]]]:
    """One clip per spec of `world` (shapes or animals), from `prompts` or else the specs' canonical
    captions -> (videos (B, 3, T, H, W), the judge's verdict per clip and attribute: does it agree).
    `model` is a MaskGIT."""
    prompts = prompts or [world.caption(s) for s in specs]
    ids, mask = text.encode(prompts, model.config.text.max_len)  # (B, L) each
    codes = model.generate(ids.to(device), mask.to(device), **sampling)  # (B, t, h, w)
    videos = tokenizer.decode(codes).float().cpu()
    return videos, [world.agreement(v, s) for v, s in zip(videos, specs)]


def shares(verdicts: list[dict[str, bool]]) -> dict[str, float]:
    """Per-clip verdicts -> the share of clips that agree, per attribute."""
    return {k: float(np.mean([v[k] for v in verdicts])) for k in verdicts[0]}


def judged_in_batches(model, text, tokenizer, world, specs: list, prompts: list[str] | None,
                      batch_size: int, **sampling) -> dict[str, float]:
    """sample_and_judge over many specs, `batch_size` clips at a time -> the share of clips that
    agree, per attribute; in the Animals world also action_<action>: among the specs of each action,
    the share whose action is judged right, and directed: among the specs that move (all but
    sitting), the share right in direction and action together."""
    verdicts = []
    for i in range(0, len(specs), batch_size):
        chunk = slice(i, i + batch_size)
        verdicts += sample_and_judge(model, text, tokenizer, world, specs[chunk],
                                     torch.device("cpu"), prompts[chunk] if prompts else None,
                                     **sampling)[1]
    if world is not animals:
        return shares(verdicts)
    # action -> its specs' verdicts on the action
    actions = {}
    for verdict, spec in zip(verdicts, specs):
        actions.setdefault(spec.action, []).append(verdict["action"])
    results = shares(verdicts) | {f"action_{a}": float(np.mean(hits)) for a, hits in actions.items()}
    results["directed"] = directed(verdicts, specs)
    return results


def directed(verdicts: list[dict[str, bool]], specs: list) -> float:
    """Among the Animals specs that move (every action but sitting), the share of clips right in
    direction and action together: a directed prompt ("a brown dog running to the left") asks for
    both, and a clip that goes the right way at the wrong pace, or sits facing the right way, is not
    what was asked."""
    moving = [v for v, s in zip(verdicts, specs) if s.action != "sitting"]
    hits = [v["direction"] and v["action"] for v in moving]
    return float(np.mean(hits)) if hits else float("nan")


def shapes_stories(model, text, tokenizer, rng, stories: int, batch_size: int,
                   **sampling) -> dict[str, float]:
    """Two-prompt Shapes stories: the same object, a new direction after the cut."""
    window = 1 + 2 * (model.config.latent_frames - 1)
    right = []
    continuous = []
    for i in range(0, stories, batch_size):
        first = [shapes.random_spec(rng) for _ in range(min(batch_size, stories - i))]
        second = [ShapeSpec(s.color, s.shape, s.size, str(rng.choice([d for d in DIRECTIONS if d != s.direction])))
                  for s in first]
        prompts = [text.encode([shapes.caption(s) for s in seg],
                               model.config.text.max_len) for seg in (first, second)]
        # (B, 3, 2 window, H, W)
        videos = make_video(model, tokenizer, prompts, [window, window], **sampling).float()
        for video, a, b in zip(videos, first, second):
            one = oracle(video[:, :window])
            two = oracle(video[:, window:])
            right += [one["direction"] == a.direction, two["direction"] == b.direction]
            jump = np.inf
            if one["end"] is not None and two["start"] is not None:
                jump = np.hypot(*np.subtract(one["end"], two["start"]))
            continuous.append(jump <= 6 and two["color"] == a.color and two["shape"] == a.shape)
    return {"story_direction": float(np.mean(right)),
            "story_continuity": float(np.mean(continuous))}


def story_specs(rng, n: int) -> list[list]:
    """n three-prompt Animals stories -> the specs of their three segments: n random specs, then
    twice the same subjects, each cut changing the action to another one the species has."""
    segments = [[animals.random_spec(rng) for _ in range(n)]]
    for _ in range(2):
        segments.append([dataclasses.replace(s, action=str(rng.choice(
            [a for a in animals.ACTIONS[s.species] if a != s.action]))) for s in segments[-1]])
    return segments


def animals_stories(model, text, tokenizer, rng, stories: int, batch_size: int,
                    **sampling) -> dict[str, float]:
    """Three-prompt Animals stories: a canonical first prompt, then two story prompts ("the dog
    jumps", "the dog sits down") that change the action and keep the subject and the scene."""
    window = 1 + 2 * (model.config.latent_frames - 1)
    acted = []
    kept = []
    for i in range(0, stories, batch_size):
        segments = story_specs(rng, min(batch_size, stories - i))
        first = segments[0]
        max_len = model.config.text.max_len
        prompts = [text.encode([animals.caption(s) for s in segments[0]], max_len)]
        prompts += [text.encode([animals.story_caption(s) for s in seg], max_len) for seg in segments[1:]]
        videos = make_video(model, tokenizer, prompts, [window, window - 1, window - 1],
                            **sampling).float()
        for b, video in enumerate(videos):
            # segments of 11, 10 and 10 frames
            cuts = ((0, window), (window, window - 1), (2 * window - 1, window - 1))
            seen = [animals.judge(video[:, start:start + length]) for start, length in cuts]
            acted += [s["action"] == seg[b].action for s, seg in zip(seen, segments)]
            for s in seen[1:]:
                kept.append(all(s[k] == getattr(first[b], k) for k in ("species", "color", "scene")))
    return {"story_action": float(np.mean(acted)), "story_kept": float(np.mean(kept))}


def shapes_long(model, text, tokenizer, rng, videos: int, frames: int = 101,
                **sampling) -> dict[str, float]:
    """101-frame Shapes videos, `videos` of each kind (one batch): one prompt moving right,
    which has to meet the edge (long_two_objects and long_partial: the share of frames with two
    or more objects, and with less than the whole object lit: cut by the edge, or fragments;
    long_direction: of the 11-frame windows that show a whole object, the share whose path reads
    right), and a ten-segment story alternating left and right (long_story_direction per
    segment, long_story_one_object per frame, long_story_kept: the last segment's colour and
    shape are the first's)."""
    window = 1 + 2 * (model.config.latent_frames - 1)
    specs = [dataclasses.replace(shapes.random_spec(rng), direction="right") for _ in range(videos)]
    prompt = text.encode([shapes.caption(s) for s in specs], model.config.text.max_len)
    # (B, 3, 101, H, W)
    videos_ = make_video(model, tokenizer, [prompt], [frames], **sampling).float()
    seen = [oracle(v) for v in videos_]
    # the 11-frame windows of each video, overlapping by one frame
    cuts = []
    for v in videos_:
        cuts += [oracle(v[:, i:i + window]) for i in range(0, frames - window + 1, window - 1)]
    # each object's area when whole
    whole = []
    for s in specs:
        still = shapes.render_shapes(dataclasses.replace(s, direction="still"), 1, 64, rng)
        whole.append(np.median(oracle(still)["areas"]))
    # per frame: partial (something lit that is not the whole object: cut by the edge, or fragments
    # left of it) and two objects
    cut = []
    two = []
    for j, w in zip(seen, whole):
        cut += [(0 < a < 0.7 * w or p) for a, p in zip(j["areas"], j["partial"])]
        two += [n >= 2 for n in j["objects"]]
    read = [c["direction"] == "right" for c in cuts if c["shape"]]
    results = {"long_two_objects": float(np.mean(two)),
               "long_partial": float(np.mean(cut)),
               "long_direction": float(np.mean(read or [0.0]))}
    # 11 + 9 x 10 = 101 frames
    segments = [window] + [window - 1] * 9
    first = []
    for _ in range(videos):
        spec = shapes.random_spec(rng)
        first.append(dataclasses.replace(spec, direction=str(rng.choice(["left", "right"]))))
    back = {"left": "right", "right": "left"}
    # ten segments, the direction turning at each cut
    turns = []
    for i in range(10):
        turns.append([dataclasses.replace(s, direction=s.direction if i % 2 == 0 else back[s.direction])
                      for s in first])
    prompts = [text.encode([shapes.caption(s) for s in seg],
                           model.config.text.max_len) for seg in turns]
    story = make_video(model, tokenizer, prompts, segments, **sampling).float()  # (B, 3, 101, H, W)
    starts = np.cumsum([0] + segments[:-1])
    right = []
    one = []
    kept = []
    for b, video in enumerate(story):
        parts = [oracle(video[:, a:a + n]) for a, n in zip(starts, segments)]
        right += [p["direction"] == seg[b].direction for p, seg in zip(parts, turns)]
        for p in parts:
            one += [n == 1 for n in p["objects"]]
        kept.append(parts[-1]["color"] == first[b].color and parts[-1]["shape"] == first[b].shape)
    return results | {"long_story_direction": float(np.mean(right)),
                      "long_story_one_object": float(np.mean(one)),
                      "long_story_kept": float(np.mean(kept))}


def animals_extras(model, text, tokenizer, rng, short: int, batch_size: int,
                   **sampling) -> dict[str, float]:
    """What people type and what long videos must hold (the Animals world only)."""
    specs = [animals.random_spec(rng) for _ in range(short)]
    # "a dog running": the rest drawn by the model
    prompts = [f"a {s.species} {s.action}" for s in specs]
    seen = judged_in_batches(model, text, tokenizer, animals, specs, prompts, batch_size, **sampling)
    results = {"short_species": seen["species"], "short_action": seen["action"]}
    # 20 samples of one prompt
    ids, mask = text.encode(["a dog running"] * 20, model.config.text.max_len)
    seen = [animals.judge(v) for v in tokenizer.decode(model.generate(ids, mask, **sampling)).float()]
    running_dogs = [j["species"] == "dog" and j["action"] == "running" for j in seen]
    results["dog_running"] = float(np.mean(running_dogs))
    # 30 s at 8 fps from one canonical prompt
    spec = animals.random_spec(rng)
    prompt = text.encode([animals.caption(spec)], model.config.text.max_len)
    long = make_video(model, tokenizer, [prompt], [241], **sampling)[0].float()  # (3, 241, H, W)
    # 23 windows of 11 frames
    windows = [animals.judge(long[:, i:i + 11]) for i in range(0, 231, 10)]
    one = [animals.judge(long[:, i:i + 1])["one_subject"] for i in range(241)]
    results |= {"long_one_subject": float(np.mean(one)),
                "long_action": float(np.mean([w["action"] == spec.action for w in windows])),
                "long_direction": float(np.mean([w["direction"] == spec.direction for w in windows]))}
    return results
