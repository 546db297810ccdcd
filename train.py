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
guarded update with clipping and EMA, progress, log) is kit.steps.Steps; the rest of the machinery
is one import away in kit/: config (presets, --set), runs (the run folder, resume), checkpoint
(files), distributed (DDP, FSDP, leaving together), faults (signals, non-finite steps, exit codes),
stream (clips and the token cache). What a run measures while it trains is in evals/. Resume is
exact: a step's draws are seeded from (seed, rank, step) and the data stream is indexed by step.

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

from evals.watch import HeldOut, watch_generator, watch_list, watch_tokenizer
from kit.checkpoint import TOKENIZERS, file_digest, generator_meta, load_tokenizer, tokenizer_meta
from kit.config import HelpWithDefaults, TrainConfig
from kit.distributed import compile_blocks, finish, gathered, grad_sync, shard, start, summed_counts
from kit.faults import TrainingStopped, UsageError, exit_code, exit_usage, quiet_worker
from media.folders import UnusableData
from kit.fold import fold_codes
from kit.runs import (RunPlan, TrainState, load_train_state, release_run, restore_modules,
                      restore_optimizers, save_run, save_weights, setup)
from kit.steps import Steps, adamw
from kit.stream import ClipStream, cache_codes, encode_clips, held_out
from maskgit import MaskGIT
from text_encoder import CaptionTokenizer
from vqgan import Discriminator, VGGPerceptual, adaptive_gan_weight, hinge_d_loss


# ----------------------------------------------------------------------------- stage 1

def tokenizer_loss(ddp_model: torch.nn.Module, model: torch.nn.Module, disc: Discriminator,
                   perceptual: VGGPerceptual | None, video: torch.Tensor, cfg: TrainConfig,
                   use_gan: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """L_tok of one micro-batch x (B, 3, T, H, W) in [-1, 1] -> (L_tok, x̂, its terms to log)."""
    out = ddp_model(video)
    rec = F.mse_loss(out.recon.float(), video)
    loss = rec + out.vq_loss
    if perceptual is not None:
        loss = loss + cfg.perceptual_weight * perceptual(out.recon.float(), video)
    terms = {"rec": rec.item(), "vq": out.vq_loss.item()}
    if use_gan:
        # L_G = -D(x̂) asks x̂ to look real; it must not train the discriminator
        disc.requires_grad_(False)
        gan = -disc(out.recon).float().mean()
        disc.requires_grad_(True)
        loss = loss + cfg.gan_weight * adaptive_gan_weight(rec, gan, model.last_layer) * gan
        terms["gan"] = gan.item()
    return loss, out.recon, terms


def discriminator_loss(ddp_disc: torch.nn.Module, video: torch.Tensor,
                       recon: torch.Tensor) -> torch.Tensor:
    """L_D on real clips and detached reconstructions (B, 3, T, H, W): nothing leaks into the
    tokenizer."""
    # (2B,): B real, then B fake
    logits = ddp_disc(torch.cat([video, recon.detach()]))
    return hinge_d_loss(logits[:len(video)].float(), logits[len(video):].float())


def perceptual_features(path: str | None, device: torch.device) -> VGGPerceptual | None:
    """ImageNet VGG16 features for L_p, from a local file: nothing is downloaded. None without
    --perceptual-weights."""
    if not path:
        return None
    perceptual = VGGPerceptual()
    perceptual.load_state_dict(load_file(path))
    return perceptual.to(device)


def clip_loader(source, cfg: TrainConfig, rank: int, world: int, start: int,
                device: torch.device):
    """The stream of training batches from the `start`-th clip on (all ranks' clips counted), each
    batch a function of its place, so that a resume on any number of ranks goes on where the run
    stopped. Clips decode in `workers` processes, each keeping 4 batches ready, into pinned memory
    on CUDA."""
    stream = ClipStream(source, cfg.batch_size, rank, world, start=start)
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                            pin_memory=device.type == "cuda",
                                            persistent_workers=cfg.workers > 0,
                                            prefetch_factor=4 if cfg.workers else None,
                                            worker_init_fn=quiet_worker))


def restart_codes(model: torch.nn.Module, ema: torch.nn.Module | None, kmeans: bool,
                  due: bool) -> dict:
    """Every `restart_every` steps (`due`) codes nobody used take recent encoder outputs (all ranks'
    counts). Codes placed anew, by a restart or by the first step's k-means, enter the EMA as they
    are, not averaged with the init they replace -> {"restarted": n} when due."""
    figures = {}
    moved = torch.arange(model.quantizer.codebook.shape[0]) if kmeans else None
    if due:
        moved = model.quantizer.restart_dead_codes()
        figures["restarted"] = len(moved)
    if ema is not None and moved is not None:
        ema.quantizer.codebook.data[moved] = model.quantizer.codebook.data[moved]
    return figures


def train_tokenizer(args, plan: RunPlan, rank: int, world: int, device: torch.device) -> None:
    master = rank == 0
    ddp = world > 1
    cfg = plan.cfg
    # the same init on every rank
    torch.manual_seed(cfg.seed)
    model = TOKENIZERS[plan.kind](plan.model_cfg).to(device)
    disc = Discriminator().to(device)
    if args.compile:
        # in place: checkpoint keys do not change
        compile_blocks(model)
    perceptual = perceptual_features(args.perceptual_weights, device)
    opt = adamw(model, cfg)
    # β1 0.5 for the discriminator, as GANs do
    disc_opt = adamw(disc, cfg, beta1=0.5)
    # the weights that are sampled
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
    # what a checkpoint holds, under the names its files use
    modules = {"model": model, "disc": disc} | ({"ema": ema} if ema is not None else {})
    opts = {"opt": opt, "opt_d": disc_opt}
    resume = load_train_state(plan.resume_from)
    step = 0
    if resume:
        restore_modules(resume.tensors, modules, resume.path)
        step = restore_optimizers(resume.tensors, resume.meta, opts, resume.path)
        if master:
            print(f"resumed from {resume.path} at step {step}")
    # the quantizer's buffers hold per-rank usage counts, which DDP must not overwrite with rank 0's
    ddp_model = DDP(model, forward_sync_buffers=False) if ddp else model
    ddp_disc = DDP(disc, forward_sync_buffers=False) if ddp else disc
    if resume and rank > 0:
        # the saved counts are all ranks' sum (summed_counts): rank 0 carries it on. After the
        # wrap: DDP's first broadcast copies rank 0's buffers to all
        model.quantizer.counts.zero_()
    # a fixed batch of held-out clips for val_psnr, val_ssim and recon.png; None: none loads
    val_video = held_out(lambda: ClipStream(plan.val_source, 8).batch(0)["video"].to(device), master)
    clips_per_step = cfg.grad_accum * cfg.batch_size * world
    start = int(resume.meta.get("clips_seen", step * clips_per_step)) if resume else 0
    loader = clip_loader(plan.source, cfg, rank, world, start, device)
    steps = Steps(cfg, plan.out, rank, world, device, step,
                  skipped_files=getattr(plan.source, "dropped", 0))
    # a fresh book: k-means runs in the first forward
    kmeans = not bool(model.quantizer.initialised)

    with steps.guard as guard:
        # SIGTERM / Ctrl-C: finish the step, save, leave
        while steps.step < cfg.max_steps:
            # seed from (seed, rank, step); set the lr
            steps.begin([opt, disc_opt])
            # the GAN joins late, once x̂ is decent
            use_gan = steps.step >= cfg.gan_start
            n = cfg.grad_accum
            # each term the mean over the n micro-batches that make one step
            logs = dict.fromkeys(("rec", "vq", "gan", "disc"), 0.0)
            for micro in range(n):
                batch = next(loader)
                # x: (B, 3, T, H, W) in [-1, 1]
                video = batch["video"].to(device, non_blocking=True)
                # bad files the stream replaced
                steps.skipped_files += batch["skipped"]
                # DDP averages the gradients on the last micro-step only
                last = micro == n - 1
                with grad_sync(ddp_model, last), steps.autocast:
                    loss, recon, terms = tokenizer_loss(ddp_model, model, disc, perceptual, video,
                                                        cfg, use_gan)
                    (loss / n).backward()
                if use_gan:
                    with grad_sync(ddp_disc, last), steps.autocast:
                        d_loss = discriminator_loss(ddp_disc, video, recon)
                        (d_loss / n).backward()
                    terms["disc"] = d_loss.item()
                for name, value in terms.items():
                    logs[name] += value / n
            # clip, skip a non-finite step, AdamW (the discriminator's only once it trains), EMA
            steps.update(logs, model, [opt, disc_opt], [opt, disc_opt] if use_gan else [opt], ema)
            figures = restart_codes(model, ema, kmeans, steps.step % cfg.restart_every == 0)
            kmeans = False
            if master and (steps.due(cfg.log_every) or steps.due(cfg.image_every)):
                if steps.due(cfg.image_every) and val_video is not None:
                    figures |= watch_tokenizer(model, val_video, steps.autocast, steps.log)
                steps.write_log(logs, figures)
            if steps.due(cfg.save_every) or guard.stop:
                # every rank joins the sum of the code counts, rank 0 writes
                with summed_counts(model.quantizer, ddp):
                    if master:
                        seen = start + (steps.step - step) * clips_per_step
                        meta = tokenizer_meta(plan.kind, plan.model_cfg, steps.step)
                        save_run(plan.out, meta | {"clips_seen": str(seen)}, cfg, modules, opts)
                        steps.log.plot(("rec", "vq", "val_psnr"))
            # a signal leaves here, with exit code 128 + its number, once the step is saved
            guard.leave_if_signalled(steps.step, world, master, plan.out)
    steps.progress.close()
    finish(model, world, master, f"done: {steps.step} steps in {steps.progress.elapsed():.0f} s; "
                                 f"weights in {os.path.join(plan.out, 'model.safetensors')}")
    if master and cfg.fold_cosine:
        fold_finished(ema if ema is not None else model, plan, steps.step, device)


def fold_finished(sampled: torch.nn.Module, plan: RunPlan, step: int, device: torch.device) -> None:
    """Near-copies of a code fold into the more used one, in model.safetensors only: the train state
    keeps the raw book for --resume."""
    cfg = plan.cfg
    print(f"folding codes within cosine {cfg.fold_cosine} of a more used one (counting them on 512 clips)", flush=True)
    left = fold_codes(sampled, plan.source, cfg.fold_cosine, cfg.batch_size, device)
    meta = tokenizer_meta(plan.kind, plan.model_cfg, step) | {"codes_left": str(left)}
    save_weights(plan.out, meta, cfg, sampled.state_dict())
    print(f"folded near-duplicate codes (cosine >= {cfg.fold_cosine}): {left} of {plan.model_cfg.codebook_size} left")


# ----------------------------------------------------------------------------- stage 2

def caption_bpe(resume: TrainState | None, init: TrainState | None, captions: list[str],
                vocab_size: int, master: bool, ddp: bool) -> CaptionTokenizer:
    """The caption tokenizer: restored on resume, the file's on --init, else trained on the cached
    captions by rank 0 and sent to all."""
    if resume:
        return CaptionTokenizer.from_json(resume.meta["text_tokenizer"])
    if init:
        return CaptionTokenizer.from_json(init.meta["text_tokenizer"])
    text_json = [CaptionTokenizer.train(captions, vocab_size).to_json() if master else None]
    if ddp:
        dist.broadcast_object_list(text_json)
    return CaptionTokenizer.from_json(text_json[0])


def draw_batch(pick: torch.Generator, codes: torch.Tensor, all_ids: torch.Tensor,
               all_masks: torch.Tensor, cfg: TrainConfig, t: int, device: torch.device):
    """A micro-batch of the token cache, drawn with replacement from `pick` -> codes (B, t, h, w),
    caption ids and mask (B, L) trimmed to the longest caption, and frames (B,): the real latent
    frames of each sample (1 for an image, by causality its clip's first latent frame), or None when
    every sample is a video."""
    idx = torch.randint(len(codes), (cfg.batch_size,), generator=pick)  # (B,)
    width = int(all_masks[idx].sum(1).max())
    ids = all_ids[idx, :width].to(device)
    mask = all_masks[idx, :width].to(device)
    frames = None
    if cfg.image_ratio > 0:
        image = torch.rand(cfg.batch_size, generator=pick) < cfg.image_ratio  # (B,)
        frames = torch.where(image, 1, t).to(device)
    return codes[idx].to(device), ids, mask, frames


def train_generator(args, plan: RunPlan, rank: int, world: int, device: torch.device) -> None:
    master = rank == 0
    ddp = world > 1
    fsdp = args.fsdp
    model_cfg = plan.model_cfg
    cfg = plan.cfg
    # frozen, in eval mode
    tokenizer = load_tokenizer(plan.tokenizer_checkpoint)[0].to(device)
    digest = file_digest(plan.tokenizer_checkpoint)
    codes, captions, skipped_files = cache_codes(plan.out, tokenizer, digest, cfg, plan.source,
                                                 rank, world, device)
    resume = load_train_state(plan.resume_from)
    # --init: a fine-tune starts from a generator file's weights and caption tokenizer
    init = load_train_state(plan.init)
    text = caption_bpe(resume, init, captions, model_cfg.text.vocab_size, master, ddp)
    # (N, L) each, tokenized once
    all_ids, all_masks = text.encode(captions, model_cfg.text.max_len)

    # the same init on every rank, restored whole, then sharded (FSDP) or replicated (DDP)
    torch.manual_seed(cfg.seed)
    model = MaskGIT(model_cfg).to(device)
    if init:
        # checked against this config by setup; fp16 files train in fp32
        model.load_state_dict({k: v.float() for k, v in init.tensors.items()})
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
    modules = {"model": model} | ({"ema": ema} if ema is not None else {})
    if resume:
        restore_modules(resume.tensors, modules, resume.path)
    if master:
        print(f"generator: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; cache: {len(codes)} "
              f"clips of {tuple(codes.shape[1:])} codes; captions: {text.vocab_size} BPE tokens")
    if args.compile:
        compile_blocks(model)
    if fsdp:
        # in place: each block a unit of its own, the rest the root's
        for module in modules.values():
            shard(module, device)
    # the generator's forward is its training loss: DDP wraps it to average the gradients
    ddp_model = DDP(model) if ddp and not fsdp else model
    # after sharding: under FSDP the optimizer holds each rank's shards
    opts = {"opt": adamw(model, cfg)}
    step = restore_optimizers(resume.tensors, resume.meta, opts, resume.path) if resume else 0
    if master and resume:
        print(f"resumed from {resume.path} at step {step}")
    # the weights that samples and figures come from
    sampled = ema if ema is not None else model
    # 64 held-out clips for val_loss and the motion probe, encoded once; none load: the watch grid
    # shows training captions
    clips = held_out(lambda: encode_clips(tokenizer, plan.val_source, 64, device), master)
    held = HeldOut(clips[0], *text.encode(clips[1][:64], model_cfg.text.max_len)) if clips else None
    # fixed for the run (a world's are judged)
    watched = watch_list(cfg.data, clips[1] if clips else captions, args.watch_prompts, seed=cfg.seed)
    if master:
        print("samples.png shows: " + " | ".join(watched.prompts))
    steps = Steps(cfg, plan.out, rank, world, device, step, skipped_files)

    with steps.guard as guard:
        # SIGTERM / Ctrl-C: finish the step, save, leave
        while steps.step < cfg.max_steps:
            # seed from (seed, rank, step); set the lr
            pick = steps.begin([opts["opt"]])
            # L_gen, the mean over the micro-batches that make one step
            total = 0.0
            for micro in range(cfg.grad_accum):
                batch = draw_batch(pick, codes, all_ids, all_masks, cfg, model_cfg.latent_frames, device)
                with grad_sync(ddp_model, micro == cfg.grad_accum - 1), steps.autocast:
                    # mask ⌈cos(πr/2)·N⌉ codes (after a prefix of latent frames in a prefix_masks
                    # share), drop 10% of captions, cross-entropy on the masked ones
                    loss = ddp_model(*batch, cfg.motion_weight, cfg.prefix_masks, cfg.prefix_frames)
                    (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
            # clip, skip a non-finite step, AdamW, EMA
            steps.update({"loss": total}, model, [opts["opt"]], [opts["opt"]], ema)
            figures = {}
            # under FSDP every rank joins the all-gathers
            if steps.due(cfg.image_every) and (master or fsdp):
                with gathered(sampled):
                    videos, figures = watch_generator(sampled, text, tokenizer, watched, held, cfg.data,
                                                      device, cfg.seed, cfg.sample_steps)
            if master and (steps.due(cfg.log_every) or figures):
                steps.write_log({"loss": total}, figures)
                if figures:
                    steps.log.grid(videos, "samples.png", watched.prompts)
            if (master or fsdp) and (steps.due(cfg.save_every) or guard.stop):
                # under FSDP all ranks gather, one writes
                meta = generator_meta(model_cfg, steps.step, text, digest)
                meta["tokenizer_checkpoint"] = plan.tokenizer_checkpoint
                save_run(plan.out, meta | ({"init": args.init} if args.init else {}), cfg, modules, opts,
                         write=master)
                if master:
                    steps.log.plot(("loss", "val_loss"))
            # a signal leaves here, with exit code 128 + its number, once the step is saved
            guard.leave_if_signalled(steps.step, world, master, plan.out)
    steps.progress.close()
    finish(model, world, master, f"done: {steps.step} steps in {steps.progress.elapsed():.0f} s; "
                                 f"weights in {os.path.join(plan.out, 'model.safetensors')}", compare=not fsdp)


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
        plan = setup(args)
    except (UsageError, ValueError) as err:
        exit_usage(err)
    # torchrun --max-restarts re-runs this command after a worker dies: it resumes the last save
    # (runs.resumed_run)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    # DDP: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain `python` runs one process
    ddp = "RANK" in os.environ
    rank, world, device = start(args.device, restarts)
    code = 0
    try:
        (train_tokenizer if args.stage == 1 else train_generator)(args, plan, rank, world, device)
    except (UsageError, UnusableData, TrainingStopped, SystemExit, KeyboardInterrupt) as err:
        # one line on stderr; 1 failed, 2 bad input, 128 + N a signal
        code = exit_code(err)
    finally:
        release_run(plan.out)
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
