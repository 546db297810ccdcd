"""
The sampler study of docs/motion.md ("The sampler on the shipped pair"): the shipped Animals pair
sampled under other settings, on seeds the evaluation never draws, and judged by animals.judge.

    python docs/motion-sampler.py prompts --cfg 1.5 --temperature 4.5   # 64 prompts, seed 2027
    python docs/motion-sampler.py stories --context-temperature 4.5     # 50 stories, seed 2028
    python docs/motion-sampler.py long --keep 2                         # 6 videos, seed 2029
    python docs/motion-sampler.py first                                 # 48 prompts, seed 2031

prompts: canonical prompts, one clip each; the share right per attribute, and the direction per
action (the judge reads it from the ground's travel when the subject moves, from its head at rest).
stories: three-prompt stories as evaluate.py makes them; the action per segment, and what the two
later segments keep of the first (species, colour, scene), one subject in every frame.
long: 241 frames from one prompt; per 11-frame window the action and direction, per video a line of
the windows' actions (r w j s f).
first: which way the ground goes once the subject stands drawn. Prompts of running, walking and
jumping; the 11-frame clip made three ways: the first frame rendered by the world and given, the
generator's own first frame kept alone and continued, the whole window at once.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import animals  # noqa: E402
from checkpoint import load_generator  # noqa: E402
from maskgit import CFG, CONTEXT_TEMPERATURE, STEPS, TEMPERATURE, make_video  # noqa: E402
from stories import sample_and_judge, story_specs  # noqa: E402

WINDOW = 11


def share(hits: list) -> float:
    return round(float(np.mean(hits)), 3)


def prompts(gen, text, tok, args) -> None:
    rng = np.random.default_rng(2027)
    specs = [animals.random_spec(rng) for _ in range(64)]
    generator = torch.Generator().manual_seed(1)
    right, by_action = {}, {}
    for i in range(0, len(specs), 32):
        _, verdicts = sample_and_judge(gen, text, tok, animals, specs[i:i + 32],
                                       torch.device("cpu"), cfg=args.cfg, steps=args.steps,
                                       temperature=args.temperature, generator=generator)
        for spec, verdict in zip(specs[i:i + 32], verdicts):
            for key, ok in verdict.items():
                right.setdefault(key, []).append(ok)
            by_action.setdefault(spec.action, []).append(verdict["direction"])
    print({k: share(v) for k, v in right.items()})
    print("direction by action:", {a: f"{sum(v)}/{len(v)}" for a, v in sorted(by_action.items())})


def stories(gen, text, tok, args) -> None:
    rng = np.random.default_rng(2028)
    acted, kept, held, one = [[], [], []], [], {"species": [], "color": [], "scene": []}, []
    for i in range(0, 50, 25):
        segments = story_specs(rng, 25)
        max_len = gen.config.text.max_len
        said = [text.encode([animals.caption(s) for s in segments[0]], max_len)]
        for seg in segments[1:]:
            said.append(text.encode([animals.story_caption(s) for s in seg], max_len))
        videos = make_video(gen, tok, said, [WINDOW, WINDOW - 1, WINDOW - 1],
                            keep_at_cut=args.keep_at_cut, cfg=args.cfg,
                            context_temperature=args.context_temperature,
                            generator=torch.Generator().manual_seed(i)).float()
        for b, video in enumerate(videos):
            cuts = ((0, WINDOW), (WINDOW, WINDOW - 1), (2 * WINDOW - 1, WINDOW - 1))
            seen = [animals.judge(video[:, start:start + n]) for start, n in cuts]
            for k, (s, seg) in enumerate(zip(seen, segments)):
                acted[k].append(s["action"] == seg[b].action)
            for s in seen[1:]:
                for key in held:
                    held[key].append(s[key] == getattr(segments[0][b], key))
                kept.append(all(s[key] == getattr(segments[0][b], key) for key in held))
                one.append(s["one_subject"])
    print("action by segment:", [share(a) for a in acted], "action:", share(sum(acted, [])))
    print("kept:", share(kept), {k: share(v) for k, v in held.items()}, "one subject:", share(one))


def long(gen, text, tok, args) -> None:
    rng = np.random.default_rng(2029)
    specs = [animals.random_spec(rng) for _ in range(6)]
    said = text.encode([animals.caption(s) for s in specs], gen.config.text.max_len)
    videos = make_video(gen, tok, [said], [241], keep=args.keep, cfg=args.cfg,
                        context_temperature=args.context_temperature,
                        generator=torch.Generator().manual_seed(5)).float()
    acted, facing = [], []
    for spec, video in zip(specs, videos):
        windows = [animals.judge(video[:, i:i + WINDOW]) for i in range(0, 231, 10)]
        acted.append(np.mean([w["action"] == spec.action for w in windows]))
        facing.append(np.mean([w["direction"] == spec.direction for w in windows]))
        print(f"  {spec.action:8s} action {acted[-1]:.2f} direction {facing[-1]:.2f} "
              + "".join((w["action"] or "-")[0] for w in windows))
    print(f"action {np.mean(acted):.2f} direction {np.mean(facing):.2f}")


def first(gen, text, tok, args) -> None:
    rng = np.random.default_rng(2031)
    specs = []
    while len(specs) < 48:
        spec = animals.random_spec(rng)
        if spec.action in ("running", "walking", "jumping"):
            specs.append(spec)
    said = text.encode([animals.caption(s) for s in specs], gen.config.text.max_len)
    # (B, 3, 11, H, W) in [-1, 1]
    real = torch.from_numpy(np.stack([animals.render(s, WINDOW, 64, rng) for s in specs]))
    real = real.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    settings = dict(context_temperature=args.context_temperature, cfg=args.cfg,
                    temperature=args.temperature)
    ways = {
        "rendered first frame": dict(prompts=[said], frames=[WINDOW - 1], init=real[:, :, :1]),
        "its own first frame": dict(prompts=[said, said], frames=[1, WINDOW - 1], keep_at_cut=1),
        "the whole window": dict(prompts=[said], frames=[WINDOW]),
    }
    for name, way in ways.items():
        videos = make_video(gen, tok, **way, **settings, generator=torch.Generator().manual_seed(0))
        seen = [animals.judge(v) for v in videos.float()]
        direction = share([j["direction"] == s.direction for j, s in zip(seen, specs)])
        action = share([j["action"] == s.action for j, s in zip(seen, specs)])
        print(f"{name}: direction {direction} action {action}",
              f"one subject {share([j['one_subject'] for j in seen])}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("study", choices=("prompts", "stories", "long", "first"))
    p.add_argument("--cfg", type=float, default=CFG)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--context-temperature", type=float, default=CONTEXT_TEMPERATURE)
    p.add_argument("--keep", type=int,
                   help="latent frames of context at a shift (default half the window)")
    p.add_argument("--keep-at-cut", type=int,
                   help="latent frames of context at a cut (default --keep)")
    p.add_argument("--generator", default="checkpoints/animals/generator.safetensors",
                   help="the generator to study: the shipped one, or a run's model.safetensors")
    p.add_argument("--tokenizer", default="checkpoints/animals/tokenizer.safetensors")
    args = p.parse_args()
    gen, text, tok, _ = load_generator(args.generator, args.tokenizer)
    t0 = time.time()
    studies = {"prompts": prompts, "stories": stories, "long": long, "first": first}
    studies[args.study](gen, text, tok, args)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
