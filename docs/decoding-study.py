"""
The decoding study of docs/motion.md ("Decoding that commits to one video"): MaskGIT's decoding with
levers that the shipped sampler does not have, each off by default, measured on the shipped Animals
pair with animals.judge on seeds that the reported evaluation never draws.

    python docs/decoding-study.py directed                  # 96 moving prompts, seed 2040
    python docs/decoding-study.py directed --cfg-early 4 --early 0.25
    python docs/decoding-study.py directed --order halton
    python docs/decoding-study.py directed --revisit
    python docs/decoding-study.py directed --corrector 2 --corrector-share 0.2
    python docs/decoding-study.py directed --first 0.5 --first-rounds 3 --corrector-share 0.3
    python docs/decoding-study.py directed --candidates 4 --score pmi
    python docs/decoding-study.py stories                    # 40 three-prompt stories, seed 2041
    python docs/decoding-study.py stories --context-scale 2
    python docs/decoding-study.py stories --candidates 4 --score cond
    python docs/decoding-study.py stories --revisit
    python docs/decoding-study.py long                       # 6 moving videos of 241 frames
    python docs/decoding-study.py long --candidates 4 --score cond
    python docs/decoding-study.py lean                       # the caption's lean per band code

The levers (the research notes in the issue name their sources):
- guidance schedule: `--cfg-early` for the first `--early` share of the steps, `--cfg` after; the
  few codes decided first set the global choices (which way the ground scrolls, the colour).
- order: "confidence" (MaskGIT: keep the surest codes, with annealed Gumbel noise) or "halton"
  (positions in the order of a 3D Halton sequence over (t, y, x), spread over time and space, each
  code drawn from its distribution).
- revisit (mask-predict, Ghazvininejad et al. 2019): decided codes may be masked again,
  scored by the probability they were drawn with; each step re-predicts the least sure.
- corrector: after the last step, `--corrector` rounds that mask the `--corrector-share` of the
  generated codes that the generator, reading the rest, finds least likely, and draw them again.
- a large first step (`--first`): that share of the codes drawn at once, each from its own
  distribution, then `--first-rounds` corrector rounds before the cosine goes on: the many codes
  drawn together vote, where a tiny first step lets one code decide.
- candidates (`--candidates`): several continuations of the same given codes (a first window's
  first latent frame drawn once), the one kept whose new codes the caption explains best.
- context guidance (InstructPix2Pix's two scales): in a window that continues frames,
  l(∅, ∅) + s_ctx·(l(ctx, ∅) − l(∅, ∅)) + cfg·(l(ctx, txt) − l(ctx, ∅)), with ∅ context the given
  codes masked; s_ctx > 1 leans on what the frames before show (the subject at a story's cut).
"""

import argparse
import importlib.util
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worlds import animals  # noqa: E402
import maskgit  # noqa: E402
from maskgit import (CFG, CONTEXT_TEMPERATURE, STEPS, TEMPERATURE, draw, gumbel,  # noqa: E402
                    mask_ratio)
from evals.stories import story_specs  # noqa: E402
from text_encoder import BOS  # noqa: E402

WINDOW = 11
MOVING = ("running", "walking", "jumping")


def halton(index: int, base: int) -> float:
    """The index-th element of the van der Corput sequence in `base`."""
    x, f = 0.0, 1.0
    while index > 0:
        f /= base
        x += f * (index % base)
        index //= base
    return x


def halton_order(t: int, h: int, w: int) -> torch.Tensor:
    """The N = t·h·w positions of a latent grid in the order a 3D Halton sequence (bases 2, 3, 5)
    first lands on them -> (N,) rank of each position (0 = first)."""
    rank = torch.full((t * h * w,), -1, dtype=torch.long)
    n, i = 0, 1
    while n < t * h * w:
        p = (int(halton(i, 2) * t) * h + int(halton(i, 3) * h)) * w + int(halton(i, 5) * w)
        if rank[p] < 0:
            rank[p] = n
            n += 1
        i += 1
    return rank


def pad_caption(states, mask, length: int, B: int):
    """Text states (1, L', D) and mask (1, L') padded to `length` and repeated to B rows."""
    pad = length - states.shape[1]
    return F.pad(states, (0, 0, 0, pad)).expand(B, -1, -1), F.pad(mask, (0, pad)).expand(B, -1)


def logits_of(model, tokens, cond, uncond, cfg, context, context_scale):
    """Guided logits (B, N, K) for tokens (B, t, h, w). context (B, N) marks the given codes."""
    B = len(tokens)
    u_states, u_mask = pad_caption(*uncond, cond[0].shape[1], B)
    if context_scale == 1.0 or context is None or not context.any():
        c, u = model.logits(torch.cat([tokens, tokens]), torch.cat([cond[0], u_states]),
                            torch.cat([cond[1], u_mask])).float().chunk(2)
        return (u + cfg * (c - u)).view(B, -1, c.shape[-1])
    blind = tokens.reshape(B, -1).masked_fill(context, model.mask_id).view(tokens.shape)
    c, u, n = model.logits(torch.cat([tokens, tokens, blind]), torch.cat([cond[0], u_states, u_states]),
                           torch.cat([cond[1], u_mask, u_mask])).float().chunk(3)
    return (n + context_scale * (u - n) + cfg * (c - u)).view(B, -1, c.shape[-1])


@torch.no_grad()
def generate(model, ids, text_mask, given=None, steps=STEPS, cfg=CFG, temperature=TEMPERATURE,
             generator=None, cfg_early=None, early=0.0, order="confidence", revisit=False,
             corrector=0, corrector_share=0.2, context_scale=1.0, first=0.0, first_rounds=0):
    """maskgit.MaskGIT.generate with the study's levers (the module docstring)."""
    c = model.config
    B = ids.shape[0]
    if given is None:
        given = torch.full((B, c.latent_frames, c.grid, c.grid), -1, dtype=torch.long)
    shape = given.shape
    context = given.reshape(B, -1) >= 0  # (B, N)
    tokens = given.reshape(B, -1).masked_fill(~context, model.mask_id)  # (B, N)
    n_unknown = (~context).sum(1)  # (B,)
    cond = (model.encode_text(ids, text_mask), text_mask)
    empty = torch.full((1, 1), BOS, dtype=torch.long)
    uncond = (model.encode_text(empty, torch.ones(1, 1, dtype=torch.bool)),
              torch.ones(1, 1, dtype=torch.bool))
    steps = maskgit.window_steps(steps, int(n_unknown.max()), tokens.shape[1])
    rank = halton_order(*shape[1:])[None].expand(B, -1) if order == "halton" else None
    # the probability each generated code was drawn with (revisit, corrector)
    drawn_logp = torch.zeros(B, tokens.shape[1])
    for s in range(steps):
        scale = cfg_early if cfg_early is not None and s < early * steps else cfg
        logits = logits_of(model, tokens.view(shape), cond, uncond, scale, context, context_scale)
        open_ = tokens == model.mask_id
        probs = logits[open_].softmax(-1)
        pick = draw(probs, generator)
        sampled = tokens.masked_scatter(open_, pick.squeeze(1))
        logp = torch.zeros(B, tokens.shape[1]).masked_scatter(
            open_, probs.gather(1, pick).squeeze(1).clamp_min(1e-30).log())
        drawn_logp = torch.where(open_, logp, drawn_logp)
        progress = torch.tensor((s + 1) / steps)
        n_mask = (mask_ratio(progress) * n_unknown).floor().long()
        if first > 0:
            # a large first step: many codes drawn at once, each from its own distribution; the
            # cosine then shares out the rest over the steps left
            rest = mask_ratio(torch.tensor(s / max(1, steps - 1)))
            n_mask = ((1 - first) * rest * n_unknown).floor().long()
        if order == "halton":
            # the positions latest in the Halton order stay masked
            candidates = ~context
            confidence = (-rank.float()).masked_fill(~open_, math.inf)
        elif revisit:
            # every generated code may be masked again, by the probability it was drawn with
            noise = temperature * (1 - (s + 1) / steps) * gumbel(logp.shape, generator, None)
            confidence = (drawn_logp + noise).masked_fill(context, math.inf)
            candidates = ~context
        else:
            noise = temperature * (1 - (s + 1) / steps) * gumbel(logp.shape, generator, None)
            confidence = (logp + noise).masked_fill(~open_, math.inf)
            candidates = open_
        n_mask = torch.minimum(n_mask, candidates.sum(1) - 1).clamp(min=0)
        low = confidence.argsort(1).argsort(1) < n_mask[:, None]
        tokens = sampled.masked_fill(low, model.mask_id)
        if s == 0:
            for _ in range(first_rounds):
                again = correct(model, tokens, shape, cond, uncond, cfg, context, corrector_share,
                                generator)
                tokens = again.view(B, -1).masked_fill(again.view(B, -1) < 0, model.mask_id)
    for _ in range(corrector):
        again = correct(model, tokens, shape, cond, uncond, cfg, context, corrector_share,
                        generator)
        tokens = generate(model, ids, text_mask, given=again, steps=steps, cfg=cfg,
                          temperature=CONTEXT_TEMPERATURE, generator=generator).view(B, -1)
    return tokens.view(shape)


def correct(model, tokens, shape, cond, uncond, cfg, context, share, generator, groups=4):
    """One corrector round's choice: score each decided code by its log-probability with its group
    (one of `groups` random quarters) masked, the rest read -> the codes (B, t, h, w) with -1 at
    the `share` least likely and where nothing is decided yet: what the caller draws again."""
    B, N = tokens.shape
    score = torch.zeros(B, N)
    group = torch.randint(groups, (B, N), generator=generator)
    for g in range(groups):
        hide = (group == g) & ~context & (tokens != model.mask_id)
        masked = tokens.masked_fill(hide, model.mask_id)
        logp = logits_of(model, masked.view(shape), cond, uncond, cfg, None, 1.0).log_softmax(-1)
        mine = logp.gather(-1, tokens.clamp_max(logp.shape[-1] - 1)[..., None]).squeeze(-1)
        score = torch.where(hide, mine, score)
    decided = ~context & (tokens != model.mask_id)
    n = (share * decided.sum(1)).long()
    low = score.masked_fill(~decided, math.inf).argsort(1).argsort(1) < n[:, None]
    return tokens.masked_fill(low | (tokens == model.mask_id), -1).view(shape)


@torch.no_grad()
def best_continuation(model, ids, text_mask, given, generator, candidates: int, score: str,
                      **levers):
    """`candidates` continuations of the given codes, the one kept whose new codes the caption
    explains best: their log-likelihood (new codes masked) under the caption ("cond"), or that less
    the same under the empty caption ("pmi", what the caption adds). A first window draws its first
    latent frame once and continues that, so all candidates show the same species, colour and scene
    and differ in how they go on."""
    B = ids.shape[0]
    c = model.config
    if given is None:
        first = generate(model, ids, text_mask, generator=generator, **levers)
        first = first[:, :1]  # (B, 1, h, w)
        given = F.pad(first, (0, 0, 0, 0, 0, c.latent_frames - 1), value=-1)
    given = F.pad(given, (0, 0, 0, 0, 0, c.latent_frames - given.shape[1]), value=-1)
    rows = ids.repeat_interleave(candidates, 0), text_mask.repeat_interleave(candidates, 0)
    many = generate(model, *rows, given=given.repeat_interleave(candidates, 0),
                    generator=generator, **levers)
    new = given.repeat_interleave(candidates, 0) < 0  # (B·k, t, h, w)
    masked = many.masked_fill(new, model.mask_id)
    logp = model.predict(masked, *rows).float().log_softmax(-1)
    ll = (logp.gather(-1, many[..., None])[..., 0] * new).sum((1, 2, 3))  # (B·k,)
    if score == "pmi":
        empty = torch.full((len(many), 1), BOS, dtype=torch.long)
        logp = model.predict(masked, empty, torch.ones_like(empty, dtype=torch.bool))
        logp = logp.float().log_softmax(-1)
        ll = ll - (logp.gather(-1, many[..., None])[..., 0] * new).sum((1, 2, 3))
    best = ll.view(B, candidates).argmax(1)
    return many.view(B, candidates, *many.shape[1:])[torch.arange(B), best]


def sampler(args):
    """The study's generate with the command line's levers."""
    def run(model, ids, text_mask, given=None, generator=None, **sampling):
        if args.candidates:
            return best_continuation(model, ids, text_mask, given, generator, args.candidates,
                                     args.score, cfg=args.cfg,
                                     temperature=sampling.get("temperature", args.temperature))
        return generate(model, ids, text_mask, given=given, generator=generator,
                        steps=sampling.get("steps", args.steps), cfg=args.cfg,
                        temperature=sampling.get("temperature", args.temperature),
                        cfg_early=args.cfg_early, early=args.early, order=args.order,
                        revisit=args.revisit, corrector=args.corrector,
                        corrector_share=args.corrector_share, context_scale=args.context_scale,
                        first=args.first, first_rounds=args.first_rounds)
    return run


def share(hits) -> float:
    return round(float(np.mean(hits)), 3)


def directed(gen, text, tok, args, n: int = 96) -> None:
    """Moving prompts (running, walking, jumping) with their direction said: direction, action,
    both right, one subject, colour, species."""
    rng = np.random.default_rng(2040)
    specs = []
    while len(specs) < n:
        spec = animals.random_spec(rng)
        if spec.action in MOVING:
            specs.append(spec)
    run = sampler(args)
    generator = torch.Generator().manual_seed(3)
    seen = []
    for i in range(0, n, 32):
        captions = [animals.caption(s) for s in specs[i:i + 32]]
        ids, mask = text.encode(captions, gen.config.text.max_len)
        seen += [animals.agreement(v, s) for v, s in
                 zip(tok.decode(run(gen, ids, mask, generator=generator)).float(), specs[i:i + 32])]
    both = [v["direction"] and v["action"] for v in seen]
    print({k: share([v[k] for v in seen]) for k in seen[0]} | {"both": share(both)})


def stories(gen, text, tok, args, n: int = 40) -> None:
    rng = np.random.default_rng(2041)
    acted, kept, one = [[], [], []], [], []
    with patched(gen, sampler(args)):
        for i in range(0, n, 20):
            segments = story_specs(rng, 20)
            max_len = gen.config.text.max_len
            said = [text.encode([animals.caption(s) for s in segments[0]], max_len)]
            for seg in segments[1:]:
                said.append(text.encode([animals.story_caption(s) for s in seg], max_len))
            videos = maskgit.make_video(gen, tok, said, [WINDOW, WINDOW - 1, WINDOW - 1],
                                        generator=torch.Generator().manual_seed(i)).float()
            for b, video in enumerate(videos):
                cuts = ((0, WINDOW), (WINDOW, WINDOW - 1), (2 * WINDOW - 1, WINDOW - 1))
                seen = [animals.judge(video[:, start:start + m]) for start, m in cuts]
                for k, (s, seg) in enumerate(zip(seen, segments)):
                    acted[k].append(s["action"] == seg[b].action)
                for s in seen[1:]:
                    kept.append(all(s[key] == getattr(segments[0][b], key)
                                    for key in ("species", "color", "scene")))
                    one.append(s["one_subject"])
    print("action by segment:", [share(a) for a in acted], "action:", share(sum(acted, [])),
          "kept:", share(kept), "one subject:", share(one))


def long(gen, text, tok, args) -> None:
    """241 frames from one prompt of a moving subject (flying and sitting subjects never drift):
    per 11-frame window the action and direction held, per 4th frame one subject."""
    rng = np.random.default_rng(2042)
    specs = []
    while len(specs) < 6:
        spec = animals.random_spec(rng)
        if spec.action in MOVING:
            specs.append(spec)
    said = text.encode([animals.caption(s) for s in specs], gen.config.text.max_len)
    with patched(gen, sampler(args)):
        videos = maskgit.make_video(gen, tok, [said], [241],
                                    generator=torch.Generator().manual_seed(5)).float()
    acted, facing, one = [], [], []
    for spec, video in zip(specs, videos):
        windows = [animals.judge(video[:, i:i + WINDOW]) for i in range(0, 231, 10)]
        acted.append(np.mean([w["action"] == spec.action for w in windows]))
        facing.append(np.mean([w["direction"] == spec.direction for w in windows]))
        frames = [animals.judge(video[:, i:i + 1]) for i in range(0, 241, 4)]
        one.append(np.mean([f["one_subject"] for f in frames]))
        print(f"  {spec.action:8s} action {acted[-1]:.2f} direction {facing[-1]:.2f} "
              + "".join((w["action"] or "-")[0] for w in windows))
    print(f"action {np.mean(acted):.3f} direction {np.mean(facing):.3f}",
          f"one subject {np.mean(one):.3f}")


class patched:
    """Within the block, gen.generate is the study's sampler (make_video calls model.generate)."""

    def __init__(self, gen, run):
        self.gen, self.run = gen, run

    def __enter__(self):
        self.gen.generate = lambda ids, mask, given=None, generator=None, **kw: self.run(
            self.gen, ids, mask, given=given, generator=generator, **kw)

    def __exit__(self, *exc):
        del self.gen.generate


def lean(gen, text, tok, args, n: int = 48) -> None:
    """How much the caption tells each code of the ground band: the true and the reversed scroll of
    motion-sampler's scroll study (its scroll_codes), the first latent frame given, the rest masked.
    Of the band codes that differ between the two scrolls, the share where the true one is the
    likelier, and by how much, under the caption, the empty caption and guided mixtures of the two."""
    sampler_study = load_study("motion-sampler.py")
    specs, true, reversed_ = sampler_study.scroll_codes(tok, n)
    said = text.encode([animals.caption(s) for s in specs], gen.config.text.max_len)
    empty = text.encode([""] * len(specs), gen.config.text.max_len)
    with torch.no_grad():
        cond = sampler_study.masked_log_probs(gen, true, 1, *said)
        uncond = sampler_study.masked_log_probs(gen, true, 1, *empty)
    # the band (code row 7) of latent frames 1.., where the two scrolls differ
    differ = true[:, 1:, 7] != reversed_[:, 1:, 7]
    for name, logp in (("the caption", cond), ("the empty caption", uncond),
                       *((f"guidance {w}", (uncond + w * (cond - uncond)).log_softmax(-1))
                         for w in (1.5, 3.0, 6.0))):
        margin = [logp.gather(-1, c[..., None])[..., 0][:, 1:, 7] for c in (true, reversed_)]
        gap = (margin[0] - margin[1])[differ]
        print(f"{name}: the true code likelier in {share((gap > 0).tolist())} of the band's codes,",
              f"by {float(gap.mean()):.2f} nats on average")


def load_study(name: str):
    """A sibling script of docs/ as a module (its name has a hyphen)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    spec = importlib.util.spec_from_file_location(name[:-3].replace("-", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("study", choices=("directed", "stories", "long", "lean"))
    p.add_argument("--cfg", type=float, default=CFG)
    p.add_argument("--cfg-early", type=float)
    p.add_argument("--early", type=float, default=0.25)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--order", choices=("confidence", "halton"), default="confidence")
    p.add_argument("--revisit", action="store_true")
    p.add_argument("--corrector", type=int, default=0)
    p.add_argument("--corrector-share", type=float, default=0.2)
    p.add_argument("--context-scale", type=float, default=1.0)
    p.add_argument("--candidates", type=int, default=0,
                   help="continuations of one first latent frame, the best kept (--score)")
    p.add_argument("--score", choices=("cond", "pmi"), default="pmi")
    p.add_argument("--first", type=float, default=0.0, help="share of codes the first step keeps")
    p.add_argument("--first-rounds", type=int, default=0,
                   help="corrector rounds right after the first step")
    p.add_argument("--generator", default="checkpoints/animals/generator.safetensors")
    p.add_argument("--tokenizer", default="checkpoints/animals/tokenizer.safetensors")
    studies = {"directed": directed, "stories": stories, "long": long, "lean": lean}
    load_study("motion-sampler.py").run_study(p.parse_args(), studies)


if __name__ == "__main__":
    main()
