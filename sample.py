"""
Make videos with a trained Phenaki: from text, as a story, as the continuation of an image or a video,
or push a real video through the stage-1 tokenizer alone.

    python sample.py "a dog running"                                        # samples/a-dog-running.mp4
    python sample.py "a dog running on the grass" "the dog jumps" "the dog sits down" --out story.mp4
    python sample.py "a cat walking in the snow" --init frame.png --out anim.gif
    python sample.py "a dog running" --samples 4                            # samples/a-dog-running-0.mp4 ...
    python sample.py "a red circle moving right" --world shapes             # the Shapes world's pair
    python sample.py --reconstruct clip.mp4 --out recon.mp4                 # prints psnr and ssim

One prompt makes one clip of --frames frames (1 + 2n, rounded up with a note; default 11). Several
prompts make a story, an equal share of --frames each (default 11 + 10 per further prompt), each
segment continuing the one before (maskgit.make_video). --init continues an image or a video.
--samples N makes N videos of the prompts in one batch: <out>-0.mp4 ... <out>-(N-1).mp4.

A video of any length is made a window at a time (maskgit.stream_video), and each window's frames
are written to the .mp4 or .gif as soon as they exist: memory stays that of one window however long
the video, and Ctrl-C leaves no half-written file behind.

Reconstruction sends a video of any length through encode and decode, a trained clip length at a
time (a last window of even length is padded with its last frame, dropped again). --out is .mp4
(H.264), .gif, or .png (a grid of frames, 11 a row). Exit codes: 0 done, 2 a usage or input error
(one line on stderr, no traceback), 1 otherwise.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from evals.measures import psnr, reconstruct, ssim
from kit.checkpoint import DEFAULT_WORLD, SHIPPED_WORLDS, load_generator, load_tokenizer, shipped
from kit.config import HelpWithDefaults, check_sampling, frame_shares, keep_at_cut
from kit.distributed import check_device
from kit.faults import UsageError, exit_code, exit_usage, signals_unwind
from kit.outputs import Outputs, check_outputs, default_out, save_output
from kit.progress import Progress
from media.video import MAX_FRAMES, read_clip
from maskgit import CFG, STEPS, TEMPERATURE, plan_windows, stream_video, window_steps

# Legend: T frames, H W pixels, t latent frames, L text length.


def run_reconstruct(args) -> None:
    model, meta = load_tokenizer(args.tokenizer_checkpoint)
    cfg = json.loads(meta.get("train_config", "{}"))
    video = read_clip(args.reconstruct, cfg.get("image_size", 64), cfg.get("fps", 8.0),
                       args.frames)
    recon = reconstruct(model, video, cfg.get("frames", 11))
    save_output(args.out, recon, cfg.get("fps", 8.0), scale=args.scale)
    print(f"frames: {video.shape[1]}")
    print(f"psnr: {psnr(recon[None], video[None]).item():.2f}")
    print(f"ssim: {ssim(recon[None], video[None]).item():.4f}")
    print(f"wrote: {args.out}")


def run_generate(args) -> None:
    if any(not p.strip() for p in args.prompts):
        raise UsageError("a prompt is empty; say what the video should show")
    model, text, tokenizer, meta = load_generator(args.checkpoint, args.tokenizer_checkpoint)
    cfg = json.loads(meta.get("train_config", "{}"))
    window = 1 + 2 * (model.config.latent_frames - 1)
    # 11 for one prompt, 10 more for each further one
    frames = args.frames or 1 + (window - 1) * len(args.prompts)
    if frames % 2 == 0:
        print(f"note: --frames {frames} is not 1 + 2n; making {frames + 1}")
        frames += 1
    for unseen in filter(None, map(text.unseen, args.prompts)):
        print(f"warning: the model never saw these words in training: {', '.join(unseen)}",
              file=sys.stderr)
    # (1, 3, T0, H, W), read no further than the video asked for
    init = (read_clip(args.init, cfg.get("image_size", 64), cfg.get("fps", 8.0), frames)[None]
            if args.init else None)
    shares = frame_shares(frames, len(args.prompts), 0 if init is None else init.shape[2])
    t = model.config.latent_frames
    if args.keep is not None and args.keep > t - 1:
        print(f"note: --keep {args.keep} leaves no room for new frames in a window of {t} latent "
              f"frames; keeping {t - 1}")
        args.keep = t - 1
    device = torch.device(args.device)
    n = args.samples
    model = model.to(device)
    tokenizer = tokenizer.to(device)
    prompts = []
    for p in args.prompts:
        prompts.append(tuple(x.to(device) for x in text.encode([p] * n, model.config.text.max_len)))
    t0 = time.time()
    # what its world taught of cuts
    cut = keep_at_cut(cfg)
    # each window's decoding steps, counted as the windows are planned: k = (context + 1) / 2
    per_window = [window_steps(args.steps, t - (context + 1) // 2, t)
                  for _, context, _ in plan_windows(t, args.keep, shares, frames - sum(shares), cut)]
    progress = Progress(sum(per_window), "decoding step")
    # decoding steps, frames and windows made so far, for the progress line
    count = {"steps": 0, "frames": 0, "windows": 0}

    def on_step(step: int, steps: int) -> None:
        count["steps"] += 1
        rate = count["frames"] * n / max(progress.elapsed(), 1e-9)
        where = f"window {count['windows'] + 1}/{len(per_window)}"
        progress.update(count["steps"], f"{where} | {rate:.1f} frames/s")

    with Outputs(args.out, n, cfg.get("fps", 8.0), args.scale) as outputs:
        # <out>-0.mp4 ... for several
        if init is not None:
            init = init.to(device).expand(n, -1, -1, -1, -1)
            outputs.write(init)
        generator = torch.Generator(device).manual_seed(args.seed)
        for piece in stream_video(model, tokenizer, prompts, shares, init, args.keep, cut,
                                  steps=args.steps, cfg=args.cfg, temperature=args.temperature,
                                  on_step=on_step, generator=generator):
            outputs.write(piece)  # (n, 3, new, H, W)
            count["frames"] += piece.shape[2]
            count["windows"] += 1
    progress.close()
    print(f"frames: {frames}" + (f" in each of {n} videos" if n > 1 else ""))
    print(f"seconds: {time.time() - t0:.1f}")
    print("wrote: " + ", ".join(outputs.paths))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate a video from text with Phenaki, or reconstruct one.",
                                formatter_class=HelpWithDefaults)
    p.add_argument("prompts", nargs="*", help="one prompt for a clip, several for a story")
    p.add_argument("--out", help=".mp4, .gif or .png (default samples/<prompt>[-N].mp4)")
    p.add_argument("--frames", type=int,
                   help="length of the video, 1 + 2n (default 11, plus 10 per further prompt)")
    p.add_argument("--init", metavar="IMAGE_OR_VIDEO", help="continue this image or video")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=STEPS, help="MaskGIT decoding steps per window")
    p.add_argument("--cfg", type=float, default=CFG,
                   help="classifier-free guidance scale (1 = none)")
    p.add_argument("--temperature", type=float, default=TEMPERATURE,
                   help="noise on the confidence, in a fresh window")
    p.add_argument("--keep", type=int,
                   help="latent frames of context at each shift (default half the window)")
    p.add_argument("--samples", type=int,
                   help="videos of the prompts, made as one batch: <out>-<i>.mp4 (default 1)")
    p.add_argument("--world", default=DEFAULT_WORLD, choices=SHIPPED_WORLDS,
                   help=f"whose shipped pair to use when no checkpoint is given (default {DEFAULT_WORLD})")
    p.add_argument("--checkpoint", help="a stage-2 generator (default: the world's shipped one)")
    p.add_argument("--tokenizer-checkpoint",
                   help="the stage-1 tokenizer it was trained on (default: the world's)")
    p.add_argument("--reconstruct", metavar="VIDEO", help="send this video through stage 1 only")
    p.add_argument("--scale", type=int, default=1, help="draw each pixel as a scale x scale block")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    args.checkpoint = args.checkpoint or shipped(args.world, "generator")
    args.tokenizer_checkpoint = args.tokenizer_checkpoint or shipped(args.world, "tokenizer")
    try:
        if not args.prompts and not args.reconstruct:
            raise UsageError("give a prompt, or --reconstruct VIDEO")
        if args.reconstruct and (args.samples is not None or args.init):
            # one reconstruction is written to --out itself: no <out>-<i> files, nothing to continue
            flag = "--init" if args.init else "--samples"
            raise UsageError(f"--reconstruct makes one video; {flag} is for generation")
        longest = f"lie in 1 to {MAX_FRAMES} (what --init and --reconstruct read back)"
        for flag, value, high, what in (("--frames", args.frames, MAX_FRAMES, longest),
                                        ("--scale", args.scale, 16, "lie in 1 to 16"),
                                        ("--keep", args.keep, None, "be at least 1 latent frame"),
                                        ("--samples", args.samples, 64, "lie in 1 to 64")):
            if value is not None and not 1 <= value <= (high or value):
                raise UsageError(f"{flag} must {what}, got {value}")
        check_sampling(args.steps, args.cfg, args.temperature, args.seed)
        args.samples = 1 if args.samples is None else args.samples
        # numbered past the videos already there: never another prompt's video replaced
        name = args.prompts[0] if args.prompts else f"{Path(args.reconstruct).stem} reconstruction"
        args.out = args.out or default_out(name, args.samples)
        check_outputs(args.out, args.samples, [p for p in (args.reconstruct, args.init) if p])
        check_device(args.device)
        with signals_unwind():
            run_reconstruct(args) if args.reconstruct else run_generate(args)
    except (UsageError, ValueError) as err:
        exit_usage(err)
    except OSError as err:
        # a full disk: the video's part is removed, the file before it kept
        sys.exit(exit_code(err))


if __name__ == "__main__":
    main()
