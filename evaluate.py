"""
Measure a trained stage: how well a tokenizer reconstructs held-out clips, and how well a generator
follows its captions.

    python evaluate.py runs/stage1-vqgan-tiny/model.safetensors [--data SPEC] [--clips 256] [--json out.json]
    python evaluate.py [checkpoints/shapes/generator.safetensors] [--prompts 200] [--stories 100] [--json out.json]
    python evaluate.py runs/mine-s2/model.safetensors --tokenizer-checkpoint runs/mine-s1/model.safetensors [--data SPEC]

Stage 1 (a tokenizer checkpoint) reports, on clips it never trained on:
  psnr        peak signal-to-noise ratio in dB, 10 log10(1 / MSE) with pixels in [0, 1], averaged over clips
  ssim        structural similarity (Wang et al. 2004): 11 x 11 Gaussian window, sigma 1.5, per frame and
              channel, averaged
  codebook_use  the share of the K codes that occur at least once in the held-out codes
  distinct_codes  how many different codes the book still has: K, or fewer once near-copies have been
                folded together at the end of training (VectorQuantizer.merge_near_duplicates)
  distinct_use  the share of those distinct codes that occur
  perplexity    exp of the entropy of the code histogram: the number of codes in effective use
In a world (shapes, animals) the held-out clips come from a seed no training run uses (EVAL_SEED);
on real data they are the run's held-out files (data.held_out) or its --val-data, or else --data. An
Animals tokenizer also reports judge_* and round_trip_*: the judge's agreement on fresh renders, and
on the same clips after encode and decode; and follow_* and nonlocal, how its codes move with a
scrolling ground (motion.code_following).

Stage 2 (a generator, default the shipped one of --world) makes a clip for each of N random
canonical prompts ("a large red circle moving right", "a brown dog running to the right on the
grass") and reads it back with the world's judge: per attribute (color, shape, size, direction; or
species, color, action, direction, scene) the share of clips that show what the prompt says, and
one_object / one_subject, the share with exactly one in every frame. Stories: in Shapes two prompts,
a new direction after the cut (story_direction; story_continuity: colour and shape stay, the object
moves at most 6 pixels); in Animals three prompts, a new action at each cut (story_action;
story_kept: species, colour and scene stay). Animals also reports short prompts ("a dog running":
short_species, short_action), the share of 20 samples of "a dog running" judged a running dog, and a
241-frame video from one prompt (long_one_subject per frame, long_action and long_direction per
11-frame window), the share of each action judged right (action_<action>), of the prompts that move
the share right in direction and action together (directed), and motion.py's figures:
the probe on 128 held-out clips (probe_*) and 4 real clips of each action continued for 3 windows
(continue_*). `--motion SEED` reports only the per-action shares and motion.py's figures, on prompts
and clips of SEED. Shapes reports ten 101-frame videos moving right, past the edge (long_*), and ten
ten-segment stories (long_story_*). A generator trained on real data has no judge: it reports
val_loss, its masked-code loss on held-out clips (validation_loss), and writes a grid of each
held-out caption's real clip above its sample. Held out means --data if given, else what the run
held out (held_out_source). Figures are printed as `name: value` lines and, with --json, written to
a file. All judging in the repo lives here and in motion.py: train.py logs `psnr` and `ssim` as
val_psnr and val_ssim in stage 1, and validation_loss, `watch` and motion.watch_motion as val_loss
and val_* in stage 2.
"""

import argparse
import json
import os

import numpy as np
import torch

from data import make_source
from evals.measures import psnr, ssim, validation_loss
from evals.motion import code_following, continuation, motion_probe
from evals.stories import (animals_extras, animals_stories, judged_in_batches, shapes_long,
                           shapes_stories)
from evals.watch import Watched, watch
from kit.checkpoint import DEFAULT_WORLD, load_generator, load_tokenizer, read_header, shipped
from kit.config import HelpWithDefaults, check_sampling
from kit.faults import UsageError, exit_usage
from kit.outputs import check_destination
from kit.progress import write_grid
from kit.stream import ClipStream, encode_clips
from maskgit import CFG, STEPS, TEMPERATURE
from worlds import WORLDS, animals

# Legend: B batch, C channels, T frames, H W pixels, K codebook size.

# world clips from this seed are never trained on
EVAL_SEED = 1_000_003


def motion_extras(model, text, tokenizer, seed: int, clips: int = 128,
                  **sampling) -> dict[str, float]:
    """The motion probe on `clips` Animals clips of `seed` and the continuation of 4 real clips per
    action (of another seed derived from it): how things move, beside what the judge reads of single
    prompts."""
    codes, captions, _ = encode_clips(tokenizer, make_source("animals", 11, 64, seed), clips,
                                      torch.device("cpu"))
    ids, mask = text.encode(captions, model.config.text.max_len)
    probe = motion_probe(model, codes, ids, mask)
    return probe | continuation(model, text, tokenizer, 4, 3, seed + 30, **sampling)


def held_out_source(data: str | None, trained: dict):
    """What a checkpoint is measured on: --data whole if given; else the run's held-out data (its
    --val-data, or the share of its files it never trained on, data.held_out), or its world at
    EVAL_SEED. Read at the run's own clip length, size, fps and crop (`trained`, the
    checkpoint's train_config)."""
    spec = data or trained.get("val_data") or trained.get("data", "shapes")
    split = "val" if not data and not trained.get("val_data") else "all"
    return make_source(spec, trained.get("frames", 11), trained.get("image_size", 64), EVAL_SEED,
                       trained.get("fps", 8.0), split, trained.get("crop", "center"))


@torch.no_grad()
def evaluate_tokenizer(model, source, clips: int, batch_size: int = 16) -> dict:
    """Reconstruct `clips` held-out clips of a source and return the stage-1 figures."""
    stream = ClipStream(source, batch_size)
    K = model.quantizer.codebook.shape[0]
    counts = torch.zeros(K)
    psnrs = []
    ssims = []
    for b in range((clips + batch_size - 1) // batch_size):
        video = stream.batch(b)["video"]  # (B, 3, T, H, W)
        codes = model.encode(video)
        recon = model.decode(codes)
        psnrs.append(psnr(recon, video))
        ssims.append(ssim(recon, video))
        counts += torch.bincount(codes.flatten(), minlength=K).float()
    owners = model.quantizer.alias.unique()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"psnr": torch.cat(psnrs)[:clips].mean().item(),
            "ssim": torch.cat(ssims)[:clips].mean().item(),
            "codebook_use": (counts > 0).float().mean().item(), "perplexity": entropy.exp().item(),
            "distinct_codes": len(owners),
            "distinct_use": (counts[owners] > 0).float().mean().item(), "clips": clips}


@torch.no_grad()
def judge_round_trip(model, clips: int, frames: int, size: int,
                     batch_size: int = 16) -> dict[str, float]:
    """How much of the Animals world's meaning survives the tokenizer: the judge's agreement on
    fresh renders (judge_*) and on the same clips after encode and decode (round_trip_*)."""
    rng = np.random.default_rng(EVAL_SEED)
    clean = {}
    trip = {}
    for i in range(0, clips, batch_size):
        specs = [animals.random_spec(rng) for _ in range(min(batch_size, clips - i))]
        # (B, T, H, W, 3) uint8
        video = np.stack([animals.render(s, frames, size, rng) for s in specs])
        # (B, 3, T, H, W)
        video = torch.from_numpy(video).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        recon = model.decode(model.encode(video))
        for totals, videos in ((clean, video), (trip, recon)):
            for v, s in zip(videos, specs):
                for k, ok in animals.agreement(v, s).items():
                    totals[k] = totals.get(k, 0) + ok / clips
    judged = {f"judge_{k}": v for k, v in clean.items()}
    return judged | {f"round_trip_{k}": v for k, v in trip.items()}


@torch.no_grad()
def evaluate_generator(model, text, tokenizer, world, prompts: int, stories: int,
                       batch_size: int = 20, **sampling) -> dict:
    """The judge's agreement on clips made from `prompts` random canonical prompts, and on `stories`
    stories; in the Animals world also on short prompts (species and action only), "a dog running"
    over 20 seeds, and a 241-frame video from one prompt."""
    rng = np.random.default_rng(EVAL_SEED)
    specs = [world.random_spec(rng) for _ in range(prompts)]
    results = judged_in_batches(model, text, tokenizer, world, specs, None, batch_size, **sampling)
    if stories:
        # cuts as sample.py makes them for a generator of this world
        judged = animals_stories if world is animals else shapes_stories
        results |= judged(model, text, tokenizer, rng, stories, batch_size,
                          keep_at_cut=world.KEEP_AT_CUT, **sampling)
    if world is animals:
        results |= animals_extras(model, text, tokenizer, rng, prompts // 2, batch_size, **sampling)
        # motion.py
        results |= motion_extras(model, text, tokenizer, EVAL_SEED, **sampling)
    else:
        results |= shapes_long(model, text, tokenizer, rng, 10, keep_at_cut=world.KEEP_AT_CUT,
                               **sampling)
    return results | {"prompts": prompts, "stories": stories}


@torch.no_grad()
def evaluate_on_real_data(model, text, tokenizer, source, clips: int, grid: str, rows: int = 8,
                          **sampling) -> dict:
    """A generator on held-out real clips: val_loss over `clips` of them, and `grid`, a PNG where
    each of up to `rows` different captions has its (first) real clip above the generator's sample
    of it."""
    codes, captions, videos = encode_clips(tokenizer, source, clips, torch.device("cpu"))
    ids, mask = text.encode(captions, model.config.text.max_len)
    results = {"val_loss": validation_loss(model, codes, ids, mask), "clips": len(codes)}
    # the first clip of each caption
    picks = [i for i, c in enumerate(captions) if captions.index(c) == i][:rows]
    shown = [captions[i] for i in picks]
    samples, _ = watch(model, text, tokenizer, Watched(None, [], shown), torch.device("cpu"),
                       **sampling)
    # (2 rows, 3, T, H, W): real, sample
    pairs = torch.stack([videos[picks], samples], dim=1).flatten(0, 1)
    labels = []
    for c in shown:
        labels += [f"real: {c}", f"sample: {c}"]
    write_grid(grid, pairs, labels)
    return results | {"grid": grid}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Evaluate a phenaki checkpoint: a tokenizer or a generator.",
        formatter_class=HelpWithDefaults)
    p.add_argument("checkpoint", nargs="?",
                   help="a stage-1 or stage-2 model.safetensors (default: the world's generator)")
    p.add_argument("--world", default=DEFAULT_WORLD, choices=sorted(WORLDS),
                   help="whose shipped pair to use when no checkpoint is given "
                   f"(default {DEFAULT_WORLD})")
    p.add_argument("--data", help="held-out data (default: the run's --val-data, or the files it "
                   "held out, or its world at an unseen seed)")
    p.add_argument("--clips", type=int, default=256,
                   help="how many held-out clips (stage 1; stage 2 on real data)")
    p.add_argument("--grid", help="stage 2 on real data: the PNG of samples beside their captions and "
                   "the real clips (default: eval_samples.png beside the checkpoint)")
    p.add_argument("--tokenizer-checkpoint",
                   help="stage 2: the generator's tokenizer (default: the world's)")
    p.add_argument("--prompts", type=int, default=200, help="stage 2: random canonical prompts")
    p.add_argument("--stories", type=int, default=100,
                   help="stage 2: stories (two prompts in Shapes, three in Animals)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--cfg", type=float, default=CFG)
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--motion", type=int, metavar="SEED",
                   help="Animals generator: the motion figures alone, on prompts and clips of SEED "
                   "(one the evaluation never draws): action per action on --prompts canonical "
                   "prompts, the motion probe and the continuation of real clips (docs/motion.md)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    args.checkpoint = args.checkpoint or shipped(args.world, "generator")
    args.tokenizer_checkpoint = args.tokenizer_checkpoint or shipped(args.world, "tokenizer")
    try:
        # the flags, and where --json and --grid go, before any work
        for flag, value, low in (("--clips", args.clips, 1), ("--prompts", args.prompts, 1),
                                 ("--stories", args.stories, 0)):
            if value < low:
                raise UsageError(f"{flag} must be at least {low}, got {value}")
        check_sampling(args.steps, args.cfg, args.temperature, args.seed)
        for written in filter(None, (args.json, args.grid)):
            check_destination(written, [args.checkpoint, args.tokenizer_checkpoint])
        # the tensors are read once, by the loader of its stage
        meta, _ = read_header(args.checkpoint)
        # the run's data, sizes and fps
        trained = json.loads(meta.get("train_config", "{}"))
        data = args.data or trained.get("data", "shapes")
        if meta.get("stage") == "2":
            if args.motion is not None and data != "animals":
                raise UsageError("--motion measures an Animals generator")
            model, text, tokenizer, meta = load_generator(args.checkpoint,
                                                          args.tokenizer_checkpoint)
            sampling = dict(steps=args.steps, cfg=args.cfg, temperature=args.temperature,
                            generator=torch.Generator().manual_seed(args.seed))
            results = {"generator": args.checkpoint, "step": int(meta["step"])}
            if args.motion is not None:
                rng = np.random.default_rng(args.motion)
                specs = [animals.random_spec(rng) for _ in range(args.prompts)]
                results |= judged_in_batches(model, text, tokenizer, animals, specs, None, 20,
                                             **sampling)
                results |= motion_extras(model, text, tokenizer, args.motion, **sampling)
            elif data in WORLDS:
                results |= evaluate_generator(model, text, tokenizer, WORLDS[data], args.prompts,
                                              args.stories, **sampling)
            else:
                # real data: no judge, but a held-out loss and samples to look at
                beside = os.path.dirname(args.checkpoint)
                grid = args.grid or os.path.join(beside, "eval_samples.png")
                source = held_out_source(args.data, trained)
                results |= evaluate_on_real_data(model, text, tokenizer, source, args.clips, grid,
                                                 **sampling)
        else:
            model, meta = load_tokenizer(args.checkpoint)
            results = {"tokenizer": meta["kind"], "step": int(meta["step"])}
            results |= evaluate_tokenizer(model, held_out_source(args.data, trained), args.clips)
            if data == "animals":
                # what the judge still reads after a round trip
                results |= judge_round_trip(model, args.clips, trained.get("frames", 11),
                                            trained.get("image_size", 64))
                # motion.py: whether its codes move with the ground
                results |= code_following(model)
    except (UsageError, ValueError) as err:
        exit_usage(err)
    for k, v in results.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
