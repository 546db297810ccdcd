"""
One training script for both stages of Phenaki, on a laptop, one GPU, or many GPUs under torchrun.

    python train.py --stage 1 --tokenizer vqgan --preset tiny            # two CPU cores
    torchrun --nproc_per_node=8 train.py --stage 1 --data /videos --preset base

Stage 1 trains a video tokenizer (vqgan.py or cvivit.py) with the loss of Phenaki §2.1 / appendix:
    L = ||x - x_hat||^2 + VQ loss + w_p * perceptual + lambda * w_gan * hinge GAN loss
where lambda is the adaptive weight of Taming Transformers eq. 7, and the GAN and the perceptual term
are off until `gan_start` and without weights respectively. Dead codebook entries are restarted every
`restart_every` steps from recent encoder outputs.

Mechanics, each kept to one place:
- Presets are functions returning (model config, train config); `--set key=value` overrides a field
  and an unknown key is an error.
- DDP: one block in `main` detects RANK, picks nccl on CUDA and gloo on CPU, wraps the models, uses
  `no_sync()` on accumulation micro-steps; rank 0 alone prints and saves.
- bf16 autocast on CUDA, fp32 on the CPU (where bf16 matmuls are far slower).
- Exact resume: the checkpoint holds the weights, the optimizer states and the step. Each step
  reseeds the RNG from (seed, rank, step) and the data stream is indexed by step, so a resumed run
  sees the same numbers and the same clips as one that never stopped.
- Checkpoints are safetensors, written to a temporary file, fsynced and renamed: `model.safetensors`
  (the weights, config in the metadata: all sample.py needs) and `train_state.safetensors` (for --resume).
"""

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open
from torch.nn.parallel import DistributedDataParallel as DDP

from cvivit import CViViT, CViViTConfig
from data import ClipStream, make_source
from vqgan import VQGAN, Discriminator, VGGPerceptual, VQGANConfig, adaptive_gan_weight, hinge_d_loss

TOKENIZERS = {"vqgan": (VQGAN, VQGANConfig), "cvivit": (CViViT, CViViTConfig)}


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


@dataclass
class TrainConfig:
    data: str = "shapes"  # "shapes", a video folder, tar shards or an image folder (data.make_source)
    frames: int = 11  # clip length, 1 + 2n
    image_size: int = 64  # clips are resized and cropped to this square
    fps: float = 8.0  # frame rate clips are sampled at from real video
    batch_size: int = 8  # clips per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 3000  # optimizer steps in all
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # the cosine decays to this
    warmup: int = 200  # linear warm-up steps
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    beta2: float = 0.99  # AdamW beta2 (beta1 is 0.9), as the paper
    grad_clip: float = 1.0  # max global gradient norm
    ema: float = 0.0  # EMA decay of the weights saved for sampling; 0 turns EMA off
    restart_every: int = 50  # steps between dead-code restarts
    gan_weight: float = 0.1  # weight of the adversarial loss once it is on
    gan_start: int = 1_000_000  # step at which the discriminator switches on
    perceptual_weight: float = 0.1  # weight of the VGG loss, when --perceptual-weights is given
    seed: int = 0  # seeds the model init, the data order and every step's RNG
    log_every: int = 50  # steps between log.jsonl lines
    save_every: int = 500  # steps between checkpoints
    image_every: int = 500  # steps between loss-curve and reconstruction PNGs
    workers: int = 0  # DataLoader worker processes per rank


def preset(name: str, tokenizer: str) -> tuple[object, TrainConfig]:
    """Named sizes. tiny: two CPU cores in under 45 minutes. base: one GPU. paper: the paper's
    C-ViViT (4 + 4 layers, width 512, 8 heads, MLP 2048, 8192 codes of dim 32) and the seed's 43M VQGAN."""
    if tokenizer not in TOKENIZERS:
        raise UsageError(f"unknown tokenizer {tokenizer!r}; choose one of {sorted(TOKENIZERS)}")
    if name == "tiny":
        model = (VQGANConfig(widths=(32, 64, 128), codebook_size=1024, code_dim=16) if tokenizer == "vqgan" else
                 CViViTConfig(dim=128, spatial_depth=2, temporal_depth=2, heads=4, mlp=512, codebook_size=1024, code_dim=16))
        # measured on Shapes: lr 1e-3 -> 1e-4 over 3000 steps reached 29.6 dB; a flat 3e-4 stalled at 19 dB
        # with grey objects (colour lost in the codes), so this preset is still being tuned
        return model, TrainConfig(max_steps=3000, lr=1e-3, min_lr=1e-4, save_every=250)
    if name == "base":
        model = (VQGANConfig(widths=(64, 128, 256), res_blocks=2, codebook_size=4096, code_dim=32) if tokenizer == "vqgan" else
                 CViViTConfig(dim=256, spatial_depth=4, temporal_depth=4, heads=8, mlp=1024, codebook_size=4096, code_dim=32))
        return model, TrainConfig(image_size=128, batch_size=16, max_steps=100_000, lr=3e-4, min_lr=3e-5,
                                  warmup=2000, ema=0.999, gan_start=20_000, workers=8)
    if name == "paper":
        model = (VQGANConfig(widths=(128, 256, 512), res_blocks=2, codebook_size=8192, code_dim=32) if tokenizer == "vqgan" else
                 CViViTConfig(dim=512, spatial_depth=4, temporal_depth=4, heads=8, mlp=2048, codebook_size=8192, code_dim=32))
        return model, TrainConfig(image_size=128, batch_size=8, max_steps=100_000, lr=1e-4, min_lr=1e-5, warmup=5000,
                                  grad_clip=10.0, ema=0.999, gan_start=10_000, workers=8)
    raise UsageError(f"unknown preset {name!r}; choose tiny, base or paper")


def override(config, assignments: list[str], prefix: str):
    """Apply `prefix.field=value` overrides to a dataclass, parsing by the field's type."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not key.startswith(prefix + "."):
            continue
        name = key[len(prefix) + 1:]
        if not sep or name not in fields:
            raise UsageError(f"unknown config key {key!r}; known: {', '.join(prefix + '.' + f for f in fields)}")
        current = getattr(config, name)
        try:
            if isinstance(current, tuple):
                changes[name] = tuple(type(current[0])(v) for v in value.split(","))
            elif isinstance(current, bool):
                changes[name] = value.lower() in ("1", "true", "yes")
            else:
                changes[name] = type(current)(float(value) if isinstance(current, int) and "e" in value else value)
        except ValueError:
            raise UsageError(f"bad value {value!r} for {key}") from None
    return dataclasses.replace(config, **changes)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write atomically: a crash mid-write leaves the previous file whole."""
    tmp = f"{path}.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{path} is not a safetensors checkpoint ({err})") from None
    if meta.get("format") != "phenaki":
        raise UsageError(f"{path} is not a phenaki checkpoint")
    return tensors, meta


def tokenizer_meta(kind: str, config, step: int) -> dict[str, str]:
    return {"format": "phenaki", "stage": "1", "kind": kind, "config": json.dumps(dataclasses.asdict(config)),
            "step": str(step)}


def build_tokenizer(kind: str, config_json: str):
    model_cls, config_cls = TOKENIZERS[kind]
    fields = json.loads(config_json)
    config = config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    return model_cls(config)


def load_tokenizer(path: str):
    """A stage-1 checkpoint -> (model in eval mode on the CPU, metadata)."""
    tensors, meta = load_checkpoint(path)
    if meta.get("stage") != "1":
        raise UsageError(f"{path} holds a stage-{meta.get('stage')} model, not a stage-1 tokenizer")
    model = build_tokenizer(meta["kind"], meta["config"])
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval(), meta


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, str]:
    """Flatten an optimizer state into safetensors-friendly tensors plus JSON for the rest."""
    state = opt.state_dict()
    tensors = {f"{prefix}.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    return tensors, json.dumps(state["param_groups"])


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups_json: str, prefix: str) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(groups_json)})


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- logging

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def save_plots(out: str, history: list[dict], video: torch.Tensor, recon: torch.Tensor) -> None:
    """loss.png: the curves so far; recon.png: rows of real frames over their reconstructions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("rec", "vq", "val_psnr"):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.legend()
    fig.savefig(os.path.join(out, "loss.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    rows = torch.stack([video[:4], recon[:4]], dim=1).flatten(0, 1)  # (8, 3, T, H, W), real above fake
    grid = rows.permute(0, 3, 2, 4, 1).flatten(2, 3).flatten(0, 1)  # (8H, T*W, 3)
    plt.imsave(os.path.join(out, "recon.png"), ((grid.clamp(-1, 1) + 1) / 2).cpu().numpy())


def progress(step: int, total: int, losses: dict, clips_per_s: float, elapsed: float, start_step: int) -> str:
    eta = (total - step) * elapsed / max(1, step - start_step)
    shown = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
    return f"step {step}/{total} | {shown} | {clips_per_s:.1f} clips/s | eta {int(eta) // 60}m{int(eta) % 60:02d}s"


# ----------------------------------------------------------------------------- stage 1

def train_tokenizer(args, model_cfg, cfg: TrainConfig, source, rank: int, world: int, device: torch.device) -> None:
    master = rank == 0
    torch.manual_seed(cfg.seed)  # the same init on every rank
    model = TOKENIZERS[args.tokenizer][0](model_cfg).to(device)
    disc = Discriminator().to(device)
    perceptual = None
    if args.perceptual_weights:
        perceptual = VGGPerceptual()
        perceptual.load_state_dict(load_file(args.perceptual_weights))
        perceptual = perceptual.to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay, fused=fused)
    opt_d = torch.optim.AdamW(disc.parameters(), cfg.lr, betas=(0.5, 0.9), weight_decay=cfg.weight_decay, fused=fused)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
    os.makedirs(args.out, exist_ok=True)
    state_path, model_path = os.path.join(args.out, "train_state.safetensors"), os.path.join(args.out, "model.safetensors")
    step = 0
    if args.resume and os.path.exists(state_path):
        tensors, meta = load_checkpoint(state_path)
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        disc.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        restore_optimizer(opt, tensors, meta["opt_groups"], "opt")
        restore_optimizer(opt_d, tensors, meta["opt_d_groups"], "opt_d")
        step = int(meta["step"])
        if master:
            print(f"resumed from {state_path} at step {step}")
    ddp = world > 1
    # quantizer buffers hold per-rank usage counts: keep DDP from overwriting them with rank 0's
    model_d = DDP(model, broadcast_buffers=False) if ddp else model
    disc_d = DDP(disc, broadcast_buffers=False) if ddp else disc
    stream = ClipStream(source, cfg.batch_size, rank, world, start_batch=step * cfg.grad_accum)
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                              pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0))
    # a fixed batch to watch reconstructions on: unseen clips of the Shapes world, else the first batch
    shown = make_source("shapes", cfg.frames, cfg.image_size, seed=cfg.seed + 1) if cfg.data == "shapes" else source
    watch = ClipStream(shown, 8).batch(0)
    watch = watch["video"].to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    history, bad_steps, t0, start_step = [], 0, time.time(), step

    def save() -> None:
        weights = (ema or model).state_dict()
        meta = tokenizer_meta(args.tokenizer, model_cfg, step)
        save_checkpoint(model_path, weights, meta | {"train_config": json.dumps(dataclasses.asdict(cfg))})
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors |= {f"disc.{k}": v for k, v in disc.state_dict().items()}
        if ema is not None:
            tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
        opt_t, groups = optimizer_tensors(opt, "opt")
        opt_d_t, groups_d = optimizer_tensors(opt_d, "opt_d")
        save_checkpoint(state_path, tensors | opt_t | opt_d_t, meta | {"opt_groups": groups, "opt_d_groups": groups_d})

    while step < cfg.max_steps:
        torch.manual_seed(cfg.seed * 1_000_003 + rank * 10_007 + step)  # RNG state is a function of the step
        for group in opt.param_groups + opt_d.param_groups:
            group["lr"] = lr_at(step, cfg)
        use_gan = step >= cfg.gan_start
        logs = {"rec": 0.0, "vq": 0.0, "gan": 0.0, "disc": 0.0}
        for micro in range(cfg.grad_accum):
            video = next(loader)["video"].to(device, non_blocking=True)  # (B, 3, T, H, W)
            last = micro == cfg.grad_accum - 1
            with (model_d.no_sync() if ddp and not last else contextlib.nullcontext()), autocast:
                out = model_d(video)
                rec = F.mse_loss(out.recon.float(), video)
                loss = rec + out.vq_loss
                if perceptual is not None:
                    loss = loss + cfg.perceptual_weight * perceptual(out.recon.float(), video)
                if use_gan:
                    disc.requires_grad_(False)  # the generator's GAN loss must not train the discriminator
                    gan = -disc(out.recon).float().mean()
                    disc.requires_grad_(True)
                    weight = adaptive_gan_weight(rec, gan, model.last_layer)
                    loss = loss + cfg.gan_weight * weight * gan
                    logs["gan"] += gan.item() / cfg.grad_accum
                (loss / cfg.grad_accum).backward()
            if use_gan:
                with (disc_d.no_sync() if ddp and not last else contextlib.nullcontext()), autocast:
                    logits = disc_d(torch.cat([video, out.recon.detach()]))  # fakes detached: no leak back
                    d_loss = hinge_d_loss(logits[: len(video)].float(), logits[len(video):].float())
                    (d_loss / cfg.grad_accum).backward()
                logs["disc"] += d_loss.item() / cfg.grad_accum
            logs["rec"] += rec.item() / cfg.grad_accum
            logs["vq"] += out.vq_loss.item() / cfg.grad_accum
        finite = torch.tensor(float(math.isfinite(logs["rec"] + logs["vq"] + logs["gan"] + logs["disc"])), device=device)
        if ddp:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank skips together
        if finite.item() < 1:
            opt.zero_grad(set_to_none=True), opt_d.zero_grad(set_to_none=True)
            bad_steps += 1
            if bad_steps >= 10:
                raise RuntimeError("the loss was not finite 10 steps in a row; lower the learning rate")
            continue
        bad_steps = 0
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step(), opt.zero_grad(set_to_none=True)
        if use_gan:
            opt_d.step(), opt_d.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - cfg.ema)
                for e, b in zip(ema.buffers(), model.buffers()):
                    e.copy_(b)
        step += 1
        if step % cfg.restart_every == 0:
            logs["restarted"] = model.quantizer.restart_dead_codes()
        tty = sys.stdout.isatty()
        if master and (tty or step % cfg.log_every == 0):  # one updating line on a terminal
            elapsed = time.time() - t0
            rate = (step - start_step) * cfg.batch_size * cfg.grad_accum * world / elapsed
            line = progress(step, cfg.max_steps, {k: logs[k] for k in ("rec", "vq", "gan", "disc")}, rate, elapsed, start_step)
            print(("\r" if tty else "") + line, end="" if tty else "\n", flush=True)
        if master and (step % cfg.log_every == 0 or step == cfg.max_steps):
            record = {"step": step, "lr": lr_at(step, cfg), "time": round(time.time() - t0, 1)} | logs
            if step % cfg.image_every == 0 or step == cfg.max_steps:
                was = model.training
                model.eval()
                with torch.no_grad(), autocast:
                    recon = model(watch).recon.float().clamp(-1, 1)
                model.train(was)
                record["val_psnr"] = (-10 * torch.log10(((recon - watch) / 2).pow(2).mean())).item()
                save_plots(args.out, history + [record], watch, recon)
            history.append(record)
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        if master and (step % cfg.save_every == 0 or step == cfg.max_steps):
            save()
    if ddp:  # a cheap end-of-run check that DDP kept every rank's weights in step
        digests = [None] * world
        dist.all_gather_object(digests, weights_digest(model))
        if master:
            print(f"weights identical across {world} ranks: {len(set(digests)) == 1}")
    if master:
        print(f"done: {step} steps in {time.time() - t0:.0f} s; weights in {model_path}")


# ----------------------------------------------------------------------------- entry point

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a Phenaki stage: 1 = video tokenizer, 2 = MaskGIT generator.")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--tokenizer", default="vqgan", help="vqgan or cvivit (stage 1)")
    p.add_argument("--tokenizer-checkpoint", help="the frozen stage-1 model (stage 2)")
    p.add_argument("--data", help="shapes (default), a video folder, tar shards, or an image folder")
    p.add_argument("--preset", default="tiny", help="tiny, base or paper")
    p.add_argument("--out", help="output folder (default runs/stage<N>-<tokenizer>-<preset>)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.safetensors")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field: model.<field>=... or train.<field>=...")
    p.add_argument("--perceptual-weights", help="VGG16 weights (.safetensors) to switch on the perceptual loss")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.stage == 2:
            raise UsageError("stage 2 is not implemented yet")
        model_cfg, cfg = preset(args.preset, args.tokenizer)
        unknown = [s for s in args.set if not s.startswith(("model.", "train."))]
        if unknown:
            raise UsageError(f"unknown config key {unknown[0]!r}: keys start with model. or train.")
        model_cfg, cfg = override(model_cfg, args.set, "model"), override(cfg, args.set, "train")
        if args.data:
            cfg = dataclasses.replace(cfg, data=args.data)
        if args.max_steps:
            cfg = dataclasses.replace(cfg, max_steps=args.max_steps)
        if cfg.frames % 2 == 0:
            raise UsageError(f"train.frames must be 1 + 2n, got {cfg.frames}")
        args.out = args.out or f"runs/stage{args.stage}-{args.tokenizer}-{args.preset}"
        source = make_source(cfg.data, cfg.frames, cfg.image_size, seed=cfg.seed, fps=cfg.fps)  # fails early on bad data
    except (UsageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # DDP: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python` runs one process
    ddp = "RANK" in os.environ
    rank, world, local = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])) if ddp else (0, 1, 0)
    device = torch.device(args.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        train_tokenizer(args, model_cfg, cfg, source, rank, world, device)
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
