"""
The sampler study of docs/motion.md ("The sampler on the shipped pair"): the shipped Animals pair
sampled under other settings, on seeds the evaluation never draws, and judged by animals.judge.

    python docs/motion-sampler.py prompts --cfg 1.5 --temperature 4.5   # 64 prompts, seed 2027
    python docs/motion-sampler.py stories --context-temperature 4.5     # 50 stories, seed 2028
    python docs/motion-sampler.py long --keep 2                         # 6 videos, seed 2029
    python docs/motion-sampler.py first                                 # 48 prompts, seed 2031
    python docs/motion-sampler.py scroll                                # 96 clips, seed 2032
    python docs/motion-sampler.py rerank                                # 64 prompts x 4, seed 2027

prompts: canonical prompts, one clip each; the share right per attribute, and the direction per
action (the judge reads it from the ground's travel when the subject moves, from its head at rest).
stories: three-prompt stories as evaluate.py makes them; the action per segment, and what the two
later segments keep of the first (species, colour, scene), one subject in every frame.
long: 241 frames from one prompt; per 11-frame window the action and direction, per video a line of
the windows' actions (r w j s f).
first: which way the ground goes once the subject stands drawn. Prompts of running, walking and
jumping; the 11-frame clip made three ways: the first frame rendered by the world and given, the
generator's own first frame kept alone and continued, the whole window at once.
scroll: does the generator know which way the ground goes, and does its sampler keep it? The true
and the reversed scroll under a given first frame, by likelihood and by sampling.
rerank: can the generator's own likelihood pick the best of four samples of a prompt? Each sample is
scored by its codes' log-likelihood under the caption (all masked, or the first latent frame given
and the rest masked), or by that less the same under the empty caption (what the caption adds).
"""

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worlds import animals  # noqa: E402
from kit.checkpoint import load_generator  # noqa: E402
from kit.config import check_sampling  # noqa: E402
from kit.faults import exit_usage, UsageError
from maskgit import CFG, CONTEXT_TEMPERATURE, STEPS, TEMPERATURE, make_video  # noqa: E402
from evals.stories import sample_and_judge, story_specs  # noqa: E402

WINDOW = 11
# the actions whose direction the judge reads from the ground's travel
MOVING = ("running", "walking", "jumping")


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
        if spec.action in MOVING:
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


@torch.no_grad()
def masked_log_probs(gen, codes, visible: int, ids, mask) -> torch.Tensor:
    """codes (B, t, h, w) with latent frames visible.. masked -> the generator's log-probabilities
    of every code at every place (B, t, h, w, K) under the captions ids, mask (B, L)."""
    tokens = codes.clone()
    tokens[:, visible:] = gen.config.codebook_size
    return gen.predict(tokens, ids, mask).float().log_softmax(-1)


def scroll_codes(tok, n: int = 96) -> tuple[list, torch.Tensor, torch.Tensor]:
    """n moving specs, each rendered facing right and facing left from the same draws, so that
    frame 0's ground is alike -> (the specs, facing right; the facing-right clips' codes (n, t, h,
    w), the true scroll; the same with the ground band (code row 7, the judge's) of latent frames
    1.. from the facing-left clips, the reversed scroll)."""
    specs, clips = [], []
    for i in range(n):
        spec = animals.random_spec(np.random.default_rng([2032, i]))
        # a bird does not run
        species = "dog" if spec.species == "bird" else spec.species
        spec = dataclasses.replace(spec, species=species, direction="right",
                                   action=MOVING[i % 3])
        for d in ("right", "left"):
            flipped = dataclasses.replace(spec, direction=d)
            clips.append(animals.render(flipped, WINDOW, 64, np.random.default_rng([2033, i])))
        specs.append(spec)
    # (2n, 3, 11, H, W) in [-1, 1]
    video = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    with torch.no_grad():
        codes = torch.cat([tok.encode(video[i:i + 32]) for i in range(0, len(video), 32)])
    true, reversed_ = codes[0::2], codes[0::2].clone()
    reversed_[:, 1:, 7] = codes[1::2, 1:, 7]
    return specs, true, reversed_


def scroll(gen, text, tok, args) -> None:
    """The true scroll and the reversed one (scroll_codes). Likelihood: frame 0 given, the rest
    masked, the band's log-likelihood of each. Sampling: frame 0 given, the rest generated; which
    of the two the band's codes match more, and the judge's direction."""
    specs, true, reversed_ = scroll_codes(tok)
    said = text.encode([animals.caption(s) for s in specs], gen.config.text.max_len)
    empty = text.encode([""] * len(specs), gen.config.text.max_len)
    for name, caption in (("the caption", said), ("no caption", empty)):
        # frame 0 alike in both: one prediction scores the two
        logp = masked_log_probs(gen, true, 1, *caption)
        # (n,) the band's log-likelihood, latent frames 1..
        ll = [logp.gather(-1, c[..., None])[:, 1:, 7].sum((1, 2, 3)) for c in (true, reversed_)]
        more = share((ll[0] > ll[1]).tolist())
        print(f"likelihood, {name}: the true scroll more likely in {more},",
              f"by {float((ll[0] - ll[1]).mean()):.1f} nats")
    given = true.clone()
    given[:, 1:] = -1
    for cfg, temperature, code_temperature in ((1.5, 4.5, 1.0), (1.5, 0.0, 1.0), (1.5, 4.5, 0.3),
                                               (1.5, 0.0, 0.05), (3.0, 4.5, 1.0)):
        out = gen.generate(*said, given=given, cfg=cfg, temperature=temperature,
                           code_temperature=code_temperature,
                           generator=torch.Generator().manual_seed(0))
        near = [(out[:, 1:, 7] == c[:, 1:, 7]).float().mean((1, 2)).numpy()
                for c in (true, reversed_)]
        right = [animals.judge(v)["direction"] == "right" for v in tok.decode(out).float()]
        print(f"sampled, guidance {cfg}, temperature {temperature}, codes at {code_temperature}:",
              f"band nearer the true scroll {share(near[0] > near[1])}, the reversed",
              f"{share(near[0] < near[1])}; judged right {share(right)}")


def log_likelihood(gen, codes, visible: int, ids, mask) -> torch.Tensor:
    """codes (B, t, h, w) -> the summed log-likelihood (B,) of latent frames visible.., masked,
    under the captions ids, mask (B, L)."""
    logp = masked_log_probs(gen, codes, visible, ids, mask)
    return logp.gather(-1, codes[..., None])[:, visible:].sum((1, 2, 3, 4))


def rerank(gen, text, tok, args, candidates: int = 4) -> None:
    rng = np.random.default_rng(2027)
    specs = [animals.random_spec(rng) for _ in range(64)]
    generator = torch.Generator().manual_seed(1)
    picked, anyone = {}, []
    for i in range(0, len(specs), 16):
        chunk = specs[i:i + 16]
        ids, mask = text.encode([animals.caption(s) for s in chunk], gen.config.text.max_len)
        ids, mask = ids.repeat_interleave(candidates, 0), mask.repeat_interleave(candidates, 0)
        codes = gen.generate(ids, mask, cfg=args.cfg, temperature=args.temperature,
                             steps=args.steps, generator=generator)
        seen = [animals.agreement(v, chunk[b // candidates])
                for b, v in enumerate(tok.decode(codes).float())]
        scores = {"the first drawn": torch.zeros(len(codes))}
        empty = text.encode([""] * len(codes), gen.config.text.max_len)
        for visible in (0, 1):
            cond = log_likelihood(gen, codes, visible, ids, mask)
            uncond = log_likelihood(gen, codes, visible, *empty)
            scores[f"likelihood, {visible} given"] = cond
            scores[f"likelihood less the empty caption's, {visible} given"] = cond - uncond
        for name, score in scores.items():
            # (B,) the kept candidate of each prompt
            best = score.view(-1, candidates).argmax(1)
            kept = [seen[b * candidates + int(k)] for b, k in enumerate(best)]
            picked.setdefault(name, []).extend(zip(chunk, kept))
        # the judge's pick, which no sampler has: is any of the four right?
        anyone.extend(any(v["direction"] for v in seen[b * candidates:(b + 1) * candidates])
                      for b, spec in enumerate(chunk) if spec.action in MOVING)
    for name, rows in picked.items():
        moving = [v["direction"] for s, v in rows if s.action in MOVING]
        print(f"{name}: direction of the moving {sum(moving)} of {len(moving)},",
              {k: share([v[k] for _, v in rows])
               for k in ("action", "species", "color", "one_subject")},
              "all right", share([all(v.values()) for _, v in rows]))
    print(f"any of the four: direction of the moving {sum(anyone)} of {len(anyone)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("study", choices=("prompts", "stories", "long", "first", "scroll", "rerank"))
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
    studies = {"prompts": prompts, "stories": stories, "long": long, "first": first,
               "scroll": scroll, "rerank": rerank}
    run_study(p.parse_args(), studies)


def run_study(args, studies: dict) -> None:
    """Load the pair of --generator and --tokenizer (a missing file or a sampling flag out of range
    is one line, as in sample.py) and run the study that args.study names, timed."""
    try:
        check_sampling(args.steps, args.cfg, args.temperature, 0)
        gen, text, tok, _ = load_generator(args.generator, args.tokenizer)
    except (UsageError, ValueError) as err:
        exit_usage(err)
    t0 = time.time()
    studies[args.study](gen, text, tok, args)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
