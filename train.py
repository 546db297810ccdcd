"""
Train Phenaki: one script for both stages, on a laptop, one GPU, or many GPUs under torchrun.

    python train.py --stage 1 --tokenizer vqgan --preset tiny            # two CPU cores
    python train.py --stage 2 --tokenizer-checkpoint runs/stage1-vqgan-tiny/model.safetensors
    torchrun --nproc_per_node=8 train.py --stage 1 --data /videos --preset base

Stage 1 trains a video tokenizer (vqgan.py or cvivit.py) with the loss of Phenaki §2.1:

    L_tok = ||x - x̂||² + L_VQ + w_p·L_p(x, x̂) + λ·w_gan·L_G          L_G = -D(x̂)
    L_VQ  = ||sg[z] - e||² + β·||z - sg[e]||²                            (VQ-VAE eq. 3)
    λ     = ||∇_last ||x - x̂||²|| / (||∇_last L_G|| + δ)                 (Taming Transformers eq. 7)
    L_D   = E[max(0, 1 - D(x))] + E[max(0, 1 + D(sg[x̂]))]                (hinge loss)

  x a clip, x̂ its reconstruction, z the encoder's unit vectors, e their nearest codes, sg stop-gradient,
  D the discriminator, ∇_last the gradient at the decoder's last layer, L_p the VGG perceptual loss
  (only with --perceptual-weights). The GAN terms start at `gan_start`. Codes nobody used are restarted
  every `restart_every` steps from recent encoder outputs; at the end, near-copies are folded together.

Stage 2 trains the MaskGIT generator (maskgit.py) behind the frozen tokenizer (Phenaki §2.2):

    L_gen = -E_{r ~ U(0,1)} mean_{i ∈ M} log p(c_i | c_{∖M}, text),    |M| = ⌈cos(πr/2)·N⌉

  c the N codes of a clip, M the masked positions, the text replaced by the empty caption 10% of the
  time (for classifier-free guidance). Every clip is encoded once into a token cache (each rank its
  share), the caption BPE is trained on the cached captions, then each step draws random clips and
  masks from the cache, so a step costs no video decoding.

Each loop shows one step on one screen. What both share (per-step seeding, the lr schedule, the
guarded update with clipping and EMA, progress, log) is steps.Steps; the rest is one import away:
config.py (presets, --set), checkpoint.py (saving, resuming, loading), distributed.py (DDP, FSDP,
leaving together), faults.py (signals, non-finite steps, exit codes), data.py, evaluate.py. Resume
is exact: a step's draws are seeded from (seed, rank, step) and the data stream is indexed by step.

Legend: B batch, T frames, H W pixels, t h w latent grid, N codes per clip, K codebook size, L text
length.
"""

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel as DDP

from kit.checkpoint import (TOKENIZERS, file_digest, generator_meta, load_checkpoint, load_tokenizer,
                        tokenizer_meta)
from kit.config import HelpWithDefaults, TrainConfig, UsageError, exit_usage
from kit.distributed import Run, compile_blocks, finish, grad_sync, shard, start, summed_counts
from evaluate import psnr, reconstruction, ssim, validation_loss, watch, watch_list
from kit.faults import TrainingStopped, exit_code, quiet_worker
from kit.folders import UnusableData
from kit.fold import fold_codes
from maskgit import MaskGIT, MaskGITConfig
from evals.motion import watch_motion
from kit.runs import (load_train_state, release_run, restore_modules, restore_optimizers, save_run,
                  save_weights, setup)
from kit.steps import Steps, adamw
from kit.stream import ClipStream, cache_codes, encode_clips, held_out
from text_encoder import CaptionTokenizer
from vqgan import Discriminator, VGGPerceptual, adaptive_gan_weight, hinge_d_loss


# ----------------------------------------------------------------------------- stage 1

def train_tokenizer(args, model_cfg, cfg: TrainConfig, sources, rank: int, world: int,
                    device: torch.device) -> None:
    master = rank == 0
    ddp = world > 1
    source, val_source = sources
    # the same init on every rank
    torch.manual_seed(cfg.seed)
    model, disc = TOKENIZERS[args.tokenizer](model_cfg).to(device), Discriminator().to(device)
    if args.compile:
        # in place: checkpoint keys do not change
        compile_blocks(model)
    perceptual = None
    if args.perceptual_weights:
        # ImageNet VGG16 features, from a local file: nothing is downloaded
        perceptual = VGGPerceptual()
        perceptual.load_state_dict(load_file(args.perceptual_weights))
        perceptual = perceptual.to(device)
    # β1 0.5 for the discriminator, as GANs do
    opt, opt_d = adamw(model, cfg), adamw(disc, cfg, beta1=0.5)
    # the weights that are sampled
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
    # what a checkpoint holds
    modules = {"model": model, "disc": disc} | ({"ema": ema} if ema is not None else {})
    # step: optimizer steps taken so far
    opts, step = {"opt": opt, "opt_d": opt_d}, 0
    # None: start afresh
    resume = load_train_state(getattr(args, "resume_from", None))
    if resume:
        restore_modules(resume.tensors, modules, resume.path)
        step = restore_optimizers(resume.tensors, resume.meta, opts, resume.path)
        if master:
            print(f"resumed from {resume.path} at step {step}")
    # the quantizer's buffers hold per-rank usage counts: keep DDP from overwriting them with rank
    # 0's
    model_d = DDP(model, forward_sync_buffers=False) if ddp else model
    disc_d = DDP(disc, forward_sync_buffers=False) if ddp else disc
    if resume and rank > 0:
        # the saved counts are all ranks' sum (summed_counts): rank 0 carries it on.
        # After the wrap: DDP's first broadcast copies rank 0's buffers to all
        model.quantizer.counts.zero_()
    # a fixed batch of held-out clips for val_psnr, val_ssim and recon.png (data.train_and_val);
    # None: none loads
    val_video = held_out(lambda: ClipStream(val_source, 8).batch(0)["video"].to(device), master)
    # the stream starts after the clips all ranks consumed (on any number of ranks), each batch a
    # function of its place. Clips decode in `workers` processes, each keeping 4 batches ready, into
    # pinned memory on CUDA
    first = step
    start = 0
    if resume:
        start = int(resume.meta.get("clips_seen", step * cfg.grad_accum * cfg.batch_size * world))
    stream = ClipStream(source, cfg.batch_size, rank, world, start=start)
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                              pin_memory=device.type == "cuda",
                                              persistent_workers=cfg.workers > 0,
                                              prefetch_factor=4 if cfg.workers else None,
                                              worker_init_fn=quiet_worker))
    steps = Steps(cfg, args.out, rank, world, device, step,
                  skipped_files=getattr(source, "dropped", 0))
    # a fresh book: k-means runs in the first forward
    kmeans = not bool(model.quantizer.initialised)

    with steps.guard as guard:
        # SIGTERM / Ctrl-C: finish the step, save, leave
        while steps.step < cfg.max_steps:
            # seed from (seed, rank, step); set the lr
            steps.begin([opt, opt_d])
            # the GAN joins late, once x̂ is decent
            use_gan, n = steps.step >= cfg.gan_start, cfg.grad_accum
            # each the mean over the micro-steps
            logs = dict.fromkeys(("rec", "vq", "gan", "disc"), 0.0)
            for micro in range(n):
                # gradient accumulation: n micro-batches make one step
                batch = next(loader)
                # x: (B, 3, T, H, W) in [-1, 1]
                video = batch["video"].to(device, non_blocking=True)
                # bad files the stream replaced
                steps.skipped_files += batch["skipped"]
                # DDP averages the gradients on the last micro-step only
                last = micro == n - 1
                with grad_sync(model_d, last), steps.autocast:
                    # L_tok
                    # out.recon: x̂ (B, 3, T, H, W); out.vq_loss: L_VQ
                    out = model_d(video)
                    # ||x - x̂||²
                    rec = F.mse_loss(out.recon.float(), video)
                    loss = rec + out.vq_loss
                    if perceptual is not None:
                        # w_p·L_p
                        loss = loss + cfg.perceptual_weight * perceptual(out.recon.float(), video)
                    if use_gan:
                        # λ·w_gan·L_G
                        # the generator's GAN loss must not train the discriminator
                        disc.requires_grad_(False)
                        # L_G = -D(x̂): look real to D
                        gan = -disc(out.recon).float().mean()
                        disc.requires_grad_(True)
                        loss = loss + cfg.gan_weight * adaptive_gan_weight(rec, gan, model.last_layer) * gan
                        logs["gan"] += gan.item() / n
                    (loss / n).backward()
                if use_gan:
                    # L_D on real clips and detached reconstructions: nothing leaks into the
                    # tokenizer
                    with grad_sync(disc_d, last), steps.autocast:
                        # (2B,): B real, then B fake
                        logits = disc_d(torch.cat([video, out.recon.detach()]))
                        d_loss = hinge_d_loss(logits[:len(video)].float(),
                                              logits[len(video):].float())
                        (d_loss / n).backward()
                    logs["disc"] += d_loss.item() / n
                logs["rec"] += rec.item() / n
                logs["vq"] += out.vq_loss.item() / n
            # clip, skip a non-finite step, AdamW (the discriminator's only once it trains), EMA
            steps.update(logs, model, [opt, opt_d], [opt, opt_d] if use_gan else [opt], ema)
            # what this step measured
            figures, moved = {}, torch.arange(model_cfg.codebook_size) if kmeans else None
            if steps.step % cfg.restart_every == 0:
                # dead codes take recent encoder outputs (all ranks' counts)
                moved = model.quantizer.restart_dead_codes()
                figures["restarted"] = len(moved)
            if ema is not None and moved is not None:
                # codes placed anew enter the EMA as they are, not averaged with the init they replace
                ema.quantizer.codebook.data[moved] = model.quantizer.codebook.data[moved]
            kmeans = False
            if master and (steps.due(cfg.log_every) or steps.due(cfg.image_every)):
                if steps.due(cfg.image_every) and val_video is not None:
                    # reconstruct the fixed batch
                    recon = reconstruction(model, val_video, steps.autocast)  # (8, 3, T, H, W)
                    # dB, mean over the 8 clips
                    figures["val_psnr"] = psnr(recon, val_video).mean().item()
                    figures["val_ssim"] = ssim(recon, val_video).mean().item()
                steps.write_log(logs, figures)
                if "val_psnr" in figures:
                    # real clips above their reconstructions, 4 pairs
                    # (8, 3, T, H, W)
                    pairs = torch.stack([val_video[:4], recon[:4]], dim=1).flatten(0, 1)
                    steps.log.grid(pairs, "recon.png")
            if steps.due(cfg.save_every) or guard.stop:
                # a signal saves before the run leaves
                with summed_counts(model.quantizer, ddp):
                    # every rank joins the sum, rank 0 writes
                    if master:
                        seen = {"clips_seen": str(start + (steps.step - first) * cfg.grad_accum * cfg.batch_size * world)}
                        save_run(args.out,
                                 tokenizer_meta(args.tokenizer, model_cfg, steps.step) | seen, cfg,
                                 modules, opts)
                        # the curves so far, beside each checkpoint
                        steps.log.plot(("rec", "vq", "val_psnr"))
            # exit 128 + the signal
            guard.leave_if_signalled(steps.step, world, master, args.out)
    steps.progress.close()
    finish(model, world, master, f"done: {steps.step} steps in {steps.progress.elapsed():.0f} s; "
                                 f"weights in {os.path.join(args.out, 'model.safetensors')}")
    if master and cfg.fold_cosine:
        # model.safetensors only: train_state keeps the raw book for --resume
        sampled = ema if ema is not None else model
        print(f"folding codes within cosine {cfg.fold_cosine} of a more used one (counting them on 512 clips)", flush=True)
        left = fold_codes(sampled, source, cfg.fold_cosine, cfg.batch_size, device)
        meta = tokenizer_meta(args.tokenizer, model_cfg, steps.step) | {"codes_left": str(left)}
        save_weights(args.out, meta, cfg, sampled.state_dict())
        print(f"folded near-duplicate codes (cosine >= {cfg.fold_cosine}): {left} of {model_cfg.codebook_size} left")


# ----------------------------------------------------------------------------- stage 2

def train_generator(args, model_cfg: MaskGITConfig, cfg: TrainConfig, sources, rank: int,
                    world: int, device: torch.device) -> None:
    master = rank == 0
    ddp = world > 1
    fsdp = args.fsdp
    source, val_source = sources
    # frozen, in eval mode
    tokenizer = load_tokenizer(args.tokenizer_checkpoint)[0].to(device)
    # the pairing; the window
    digest, t = file_digest(args.tokenizer_checkpoint), model_cfg.latent_frames
    cached = cache_codes(args.out, tokenizer, digest, cfg, source, rank, world, device)
    codes, captions, skipped_files = cached
    # None: start afresh
    resume = load_train_state(getattr(args, "resume_from", None))
    # --init: a fine-tune starts from a generator file's weights and caption tokenizer (a resumed
    # one from its own train state)
    init = None if resume or not args.init else load_checkpoint(args.init)
    # the caption tokenizer: restored on resume, the file's on --init, else trained on the cached
    # captions by rank 0 and sent to all
    if resume:
        text_json = resume.meta["text_tokenizer"]
    elif init:
        text_json = init[1]["text_tokenizer"]
    else:
        text_json = [CaptionTokenizer.train(captions, model_cfg.text.vocab_size).to_json() if master else None]
        if ddp:
            dist.broadcast_object_list(text_json)
        text_json = text_json[0]
    # byte-level BPE, saved in every checkpoint
    text = CaptionTokenizer.from_json(text_json)
    # (N, L) each, tokenized once
    all_ids, all_masks = text.encode(captions, model_cfg.text.max_len)

    # the generator: the same init on every rank, restored whole, then sharded (FSDP) or replicated
    # (DDP)
    torch.manual_seed(cfg.seed)
    model = MaskGIT(model_cfg).to(device)
    if init:
        # checked against this config by checkpoint.init_config; fp16 files train in fp32
        model.load_state_dict({k: v.float() for k, v in init[0].items()})
    # the weights that are sampled
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
    # what a checkpoint holds
    modules = {"model": model} | ({"ema": ema} if ema is not None else {})
    if resume:
        restore_modules(resume.tensors, modules, resume.path)
    if master:
        print(f"generator: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; cache: {len(codes)} "
              f"clips of {tuple(codes.shape[1:])} codes; captions: {text.vocab_size} BPE tokens")
    if args.compile:
        # each transformer block
        compile_blocks(model)
    # One network, four handles: `model` holds the weights (the optimizer and checkpoints read it);
    # `run` calls its loss and sampling through forward, where DDP's and FSDP's hooks see them;
    # `sampler` is what samples the validation grid (the EMA's run when there is one); `loss_d` is
    # `run` under DDP, the handle the loss goes through.
    run = Run(model)
    sampler = Run(ema) if ema is not None else run
    if fsdp:
        shard(run, device)
        if ema is not None:
            shard(sampler, device)
    loss_d = DDP(run) if ddp and not fsdp else run
    # after sharding: under FSDP the optimizer holds each rank's shards
    opts, step = {"opt": adamw(model, cfg)}, 0
    if resume:
        step = restore_optimizers(resume.tensors, resume.meta, opts, resume.path)
        if master:
            print(f"resumed from {resume.path} at step {step}")
    # 64 held-out clips for val_loss, encoded once; the watch grid's 8 prompts (a world's are
    # judged)
    # (64, t, h, w) codes
    held = held_out(lambda: encode_clips(tokenizer, val_source, 64, device), master)
    # none loads: watch training captions
    val_codes, val_captions = (held[0], held[1]) if held else (None, captions)
    val_ids, val_mask = text.encode(val_captions[:64], model_cfg.text.max_len)  # (64, L) each
    # fixed for the run
    watched = watch_list(cfg.data, val_captions, args.watch_prompts, seed=cfg.seed)
    if master:
        print("samples.png shows: " + " | ".join(watched[2]))
    steps = Steps(cfg, args.out, rank, world, device, step, skipped_files)

    with steps.guard as guard:
        # SIGTERM / Ctrl-C: finish the step, save, leave
        while steps.step < cfg.max_steps:
            # seed from (seed, rank, step); set the lr
            pick = steps.begin(list(opts.values()))
            # L_gen, the mean over the micro-steps
            total = 0.0
            for micro in range(cfg.grad_accum):
                # gradient accumulation: micro-batches make one step
                # (B,), with replacement
                idx = torch.randint(len(codes), (cfg.batch_size,), generator=pick)
                # trim the padding this batch does not need
                width = int(all_masks[idx].sum(1).max())
                # (B, L)
                ids, mask = all_ids[idx, :width].to(device), all_masks[idx, :width].to(device)
                # all t latent frames are real
                frames = None
                if cfg.image_ratio > 0:
                    # by causality an image's codes are its clip's first latent frame
                    image = torch.rand(cfg.batch_size, generator=pick) < cfg.image_ratio  # (B,)
                    frames = torch.where(image, 1, t).to(device)  # (B,) real latent frames
                with grad_sync(loss_d, micro == cfg.grad_accum - 1), steps.autocast:
                    # L_gen: mask ⌈cos(πr/2)·N⌉ codes (after a prefix of latent frames in a
                    # prefix_masks share), drop 10% of captions, cross-entropy on the masked ones
                    loss = loss_d("loss", codes[idx].to(device), ids, mask, frames,
                                  cfg.motion_weight, cfg.prefix_masks, cfg.prefix_frames)
                    (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
            # clip, AdamW, EMA
            steps.update({"loss": total}, model, list(opts.values()), list(opts.values()), ema)
            # what this step measured beside the loss
            figures = {}
            if steps.due(cfg.image_every) and (master or fsdp):
                # under FSDP every rank joins the all-gathers
                model.eval()
                if val_codes is not None:
                    figures["val_loss"] = validation_loss(sampler, val_codes, val_ids, val_mask, cfg.seed)
                # one clip for each watched prompt; in a world, its attributes read back by the
                # judge
                videos, verdicts = watch(sampler, text, tokenizer, watched, device,
                                         steps=cfg.sample_steps,
                                         generator=torch.Generator(device).manual_seed(cfg.seed))
                if val_codes is not None:
                    # the motion probe on the held-out clips
                    held_clips = (val_codes, val_ids.to(device), val_mask.to(device))
                    verdicts |= watch_motion(sampler, text, tokenizer, held_clips, cfg.data, device,
                                             cfg.seed, steps=cfg.sample_steps,
                                             generator=torch.Generator(device).manual_seed(cfg.seed))
                model.train()
                # shares of clips that agree; the probe
                figures |= {f"val_{k}": v for k, v in verdicts.items()}
                if fsdp:
                    # FSDP keeps a root unit gathered after its forward: shard it again before
                    # updates
                    sampler.reshard()
            if master and (steps.due(cfg.log_every) or figures):
                # what is measured is logged
                steps.write_log({"loss": total}, figures)
                if figures:
                    # (8, 3, T, H, W): a clip under each prompt
                    steps.log.grid(videos, "samples.png", watched[2])
            if (master or fsdp) and (steps.due(cfg.save_every) or guard.stop):
                # FSDP: all ranks gather, one writes
                meta = generator_meta(model_cfg, steps.step, text, digest)
                meta["tokenizer_checkpoint"] = args.tokenizer_checkpoint
                if args.init:
                    meta["init"] = args.init
                save_run(args.out, meta, cfg, modules, opts, write=master)
                if master:
                    # the curves so far, beside each checkpoint
                    steps.log.plot(("loss", "val_loss"))
            # exit 128 + the signal
            guard.leave_if_signalled(steps.step, world, master, args.out)
    steps.progress.close()
    finish(model, world, master, f"done: {steps.step} steps in {steps.progress.elapsed():.0f} s; "
                                 f"weights in {os.path.join(args.out, 'model.safetensors')}", compare=not fsdp)


# ----------------------------------------------------------------------------- entry point

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a Phenaki stage: 1 = video tokenizer, 2 = MaskGIT generator.",
                                formatter_class=HelpWithDefaults)
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--tokenizer", default="vqgan",
                   help="stage 1: vqgan (the shipped one) or cvivit (the paper's)")
    p.add_argument("--tokenizer-checkpoint", help="stage 2: the frozen stage-1 model.safetensors")
    p.add_argument("--data",
                   help="shapes (the preset's), a video folder, tar shards, or an image folder")
    p.add_argument("--val-data", help="held-out data (default: a name-hash share of --data's files)")
    p.add_argument("--watch-prompts", metavar="FILE", help="stage 2: captions to sample in samples.png, one a line "
                   "(default: the held-out captions; a world's random prompts)")
    p.add_argument("--preset", default="tiny", help="tiny, base or paper (config.py)")
    p.add_argument("--out", help="output folder (default runs/stage<N>-<tokenizer>-<preset>)")
    p.add_argument("--max-steps", type=int, help="optimizer steps in all (default: the preset's)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (--set may change lr, steps, logging)")
    p.add_argument("--force", action="store_true",
                   help="start a new run in an --out that holds one (its files go)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field: model.<field>=... or train.<field>=... (config.py)")
    p.add_argument("--init", metavar="FILE", help="stage 2: fine-tune the generator in FILE (its weights, "
                   "model config and caption tokenizer; a fresh optimizer from step 0)")
    p.add_argument("--image-ratio", type=float, help="stage 2: share of samples trained as images")
    p.add_argument("--perceptual-weights",
                   help="stage 1: VGG16 weights (.safetensors) to switch on the perceptual loss")
    p.add_argument("--fsdp", action="store_true",
                   help="stage 2 under torchrun: shard the generator (FSDP2) across ranks")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (bench.py --compile says whether it pays here)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        # fails early on bad flags or data
        model_cfg, cfg, sources = setup(args)
    except (UsageError, ValueError) as err:
        exit_usage(err)
    # torchrun --max-restarts re-runs this command after a worker dies: it resumes the last save
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    args.resume = args.resume or restarts > 0

    # DDP: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain `python` runs one process
    ddp = "RANK" in os.environ
    rank, world, device = start(args.device, restarts)
    code = 0
    try:
        (train_tokenizer if args.stage == 1 else train_generator)(args, model_cfg, cfg, sources, rank, world, device)
    except (UsageError, UnusableData, TrainingStopped, SystemExit, KeyboardInterrupt) as err:
        # one line on stderr; 1 failed, 2 bad input, 128 + N a signal
        code = exit_code(err)
    finally:
        release_run(args.out)
        if ddp:
            dist.destroy_process_group()
    if ddp:
        # leave before C++ teardown, where torch 2.13's distributed threads can abort a finished run
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
