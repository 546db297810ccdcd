"""
One training script for both stages of Phenaki, on a laptop, one GPU, or many GPUs under torchrun.

    python train.py --stage 1 --tokenizer vqgan --preset tiny            # two CPU cores
    python train.py --stage 2 --tokenizer-checkpoint runs/stage1-vqgan-tiny/model.safetensors
    torchrun --nproc_per_node=8 train.py --stage 1 --data /videos --preset base

Stage 1 trains a video tokenizer (vqgan.py or cvivit.py) with the loss of Phenaki §2.1 / appendix:
    L = ||x - x_hat||^2 + VQ loss + w_p * perceptual + lambda * w_gan * hinge GAN loss
where lambda is the adaptive weight of Taming Transformers eq. 7, and the GAN and the perceptual term
are off until `gan_start` and without weights respectively. Dead codebook entries are restarted every
`restart_every` steps from recent encoder outputs.

Stage 2 trains the MaskGIT generator (maskgit.py) behind a frozen tokenizer: encode `cache_clips` clips
once into a token cache (data.build_token_cache, each rank its share), train the caption BPE on
their captions, then take cheap steps from the cache: random clips, a random mask each, cross-entropy
on the masked codes. At `image_every` steps it samples the Shapes prompts of a fixed set of specs and
logs the oracle's agreement (val_color, val_shape, ...) beside a grid of the samples.

Mechanics, each kept to one place:
- Presets are functions returning (model config, train config); `--set key=value` overrides a field
  and an unknown key is an error.
- DDP: one block in `main` detects RANK, picks nccl on CUDA and gloo on CPU, wraps the models, uses
  `no_sync()` on accumulation micro-steps; rank 0 alone prints and saves.
- FSDP (`--fsdp`, stage 2): `shard` splits each transformer block's parameters across the ranks
  instead; saving gathers them (`whole`) so that checkpoints are the same files as under DDP.
- `--compile` compiles each transformer block (or a tokenizer's forward); bench.py measures if it pays.
- bf16 autocast on CUDA, fp32 on the CPU (where bf16 matmuls are far slower).
- Exact resume: the checkpoint holds the weights, the optimizer states and the step. Each step
  reseeds the RNG from (seed, rank, step) and the data stream is indexed by step, so a resumed run
  sees the same numbers and the same clips as one that never stopped.
- Checkpoints are safetensors, written to a temporary file, fsynced and renamed: `model.safetensors`
  (the weights, config in the metadata: all sample.py needs) and `train_state.safetensors` (for --resume).
  The file each replaces is kept as `.prev`, and --resume falls back to it if the newest is unreadable.
Faults, each tested in tests/test_faults.py:
- SIGKILL at any moment loses only the steps since the last checkpoint; --resume then gives the
  weights of a run that never stopped.
- SIGTERM or Ctrl-C: the step in flight finishes, a checkpoint is saved, the run exits with 128 + the signal.
- A non-finite loss on any rank skips that step's update (the step still counts, so the next batch
  differs); ten in a row stop the run with one line (`StepGuard`).
- A failed save (a full disk) keeps the previous checkpoint and the run goes on, saying so.
- Under `torchrun --max-restarts=N` a restarted worker group resumes from the last checkpoint by itself.
- Bad files are skipped with one line each and counted (`skipped_files` in log.jsonl); data with
  nothing usable stops at once (data.UnusableData). A mistake on the command line is one line, exit 2.
"""

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from cvivit import CViViT, CViViTConfig
from data import (ClipStream, UnusableData, agreement, build_token_cache, caption, load_token_cache, make_source,
                  random_spec)
from maskgit import MaskGIT, MaskGITConfig
from text_encoder import CaptionTokenizer, TextEncoderConfig
from transformer import Block
from vqgan import VQGAN, Discriminator, VGGPerceptual, VQGANConfig, adaptive_gan_weight, hinge_d_loss

TOKENIZERS = {"vqgan": (VQGAN, VQGANConfig), "cvivit": (CViViT, CViViTConfig)}

# the models that ship with the repo, used by sample.py and evaluate.py when no checkpoint is given
DEFAULT_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "tokenizer.safetensors")
DEFAULT_GENERATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "generator.safetensors")


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
    merge_codes: float = 0.0  # at the end, fold codes within this cosine of a more used one; 0: keep all
    gan_weight: float = 0.1  # weight of the adversarial loss once it is on
    gan_start: int = 1_000_000  # step at which the discriminator switches on
    perceptual_weight: float = 0.1  # weight of the VGG loss, when --perceptual-weights is given
    seed: int = 0  # seeds the model init, the data order and every step's RNG
    log_every: int = 50  # steps between log.jsonl lines
    save_every: int = 500  # steps between checkpoints
    image_every: int = 500  # steps between loss-curve and reconstruction PNGs
    workers: int = 0  # DataLoader worker processes per rank
    cache_clips: int = 20_000  # stage 2: clips encoded into the token cache (all of a smaller dataset)
    image_ratio: float = 0.0  # stage 2: share of samples trained as images (their first latent frame alone)
    sample_steps: int = 24  # stage 2: decoding steps of the sample grid and the alignment check in the log


def preset(name: str, tokenizer: str) -> tuple[object, TrainConfig]:
    """Named sizes. tiny: two CPU cores in under 45 minutes. base: one GPU. paper: the paper's
    C-ViViT (4 + 4 layers, width 512, 8 heads, MLP 2048, 8192 codes of dim 32) and the seed's 43M VQGAN."""
    if tokenizer not in TOKENIZERS:
        raise UsageError(f"unknown tokenizer {tokenizer!r}; choose one of {sorted(TOKENIZERS)}")
    if name == "tiny":
        model = (VQGANConfig(widths=(32, 64, 128), codebook_size=1024, code_dim=16) if tokenizer == "vqgan" else
                 CViViTConfig(dim=128, spatial_depth=2, temporal_depth=2, heads=4, mlp=512, codebook_size=1024, code_dim=16))
        # the VQGAN is stable at 3e-4 but not at 1e-3 (its reconstructions fall back to grey). At the
        # end, near-copies of a code are folded into it: most of the VQGAN's 1024 codes are black
        if tokenizer == "cvivit":
            return model, TrainConfig(max_steps=8000, lr=1e-3, min_lr=1e-4, save_every=250, merge_codes=0.95)
        return model, TrainConfig(max_steps=8000, lr=3e-4, min_lr=3e-5, save_every=250, merge_codes=0.95)
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


def generator_preset(name: str) -> tuple[MaskGITConfig, TrainConfig]:
    """Stage-2 sizes. tiny: two CPU cores in under 90 minutes. base: one GPU. paper: Phenaki's 1.8B
    generator (24 layers, width 2048, 32 heads) over the paper's 8192 codes."""
    if name == "tiny":
        # 384 codes a clip make every step costly on a CPU: a narrow model and many cheap steps
        text = TextEncoderConfig(vocab_size=512, dim=128, depth=2, heads=4, mlp=512)
        return (MaskGITConfig(dim=128, depth=4, heads=4, mlp=512, text=text),
                TrainConfig(batch_size=32, max_steps=3500, lr=1e-3, min_lr=5e-5, warmup=200, weight_decay=0.01,
                            cache_clips=10_000, save_every=250, image_every=250))
    if name == "base":
        text = TextEncoderConfig(vocab_size=8192, dim=512, depth=6, heads=8, mlp=2048, max_len=64)
        return (MaskGITConfig(codebook_size=4096, grid=16, dim=768, depth=12, heads=12, mlp=3072, text=text),
                TrainConfig(image_size=128, batch_size=32, max_steps=200_000, lr=4e-4, min_lr=4e-5, warmup=5000,
                            weight_decay=0.045, ema=0.9999, cache_clips=1_000_000, image_ratio=0.2, workers=8))
    if name == "paper":
        text = TextEncoderConfig(vocab_size=32_000, dim=1024, depth=12, heads=16, mlp=4096, max_len=64)
        return (MaskGITConfig(codebook_size=8192, grid=16, dim=2048, depth=24, heads=32, mlp=8192, text=text),
                TrainConfig(image_size=128, batch_size=16, max_steps=1_000_000, lr=1e-4, min_lr=1e-5, warmup=10_000,
                            weight_decay=0.045, ema=0.9999, cache_clips=10_000_000, image_ratio=0.2, workers=8))
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
        head, dot, _ = name.partition(".")
        if dot and head in fields and dataclasses.is_dataclass(getattr(config, head)):  # a nested config
            changes[head] = override(changes.get(head, getattr(config, head)), [item], f"{prefix}.{head}")
            continue
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
    """Write atomically and keep the previous file as `path.prev`: a crash or a full disk mid-write
    leaves the last good checkpoint whole. A failed write raises OSError and leaves no temporary."""
    tmp = f"{path}.tmp"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except (OSError, SafetensorError) as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"could not write {path}: {err}") from None
    if os.path.exists(path):  # keep it as .prev, through a hard link, so that `path` never goes missing
        try:
            if os.path.exists(f"{path}.prev.tmp"):
                os.remove(f"{path}.prev.tmp")
            os.link(path, f"{path}.prev.tmp")
            os.replace(f"{path}.prev.tmp", f"{path}.prev")
        except OSError:  # a filesystem without hard links: for a moment only .prev exists
            os.replace(path, f"{path}.prev")
    os.replace(tmp, path)
    if os.name == "posix":  # make the renames durable (Windows cannot open a folder to fsync it)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def export_half(src: str, dst: str, tokenizer: str | None = None) -> None:
    """Copy a model.safetensors with its floating-point tensors in fp16: how checkpoints/ is made.
    For a generator, `tokenizer` names the exported tokenizer it will be paired with: its sha256
    replaces the one the generator was trained on, which is kept as `trained_on_sha256`."""
    tensors, meta = load_checkpoint(src)
    if tokenizer is not None:
        meta |= {"trained_on_sha256": meta["tokenizer_sha256"], "tokenizer_sha256": file_digest(tokenizer)}
    save_checkpoint(dst, {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, meta)


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


def load_train_state(out: str, resume: bool) -> tuple[str, dict, dict[str, str]] | None:
    """The train state to resume from -> (its path, tensors, metadata): <out>/train_state.safetensors,
    or the previous one kept beside it when the newest is missing or unreadable. None: start afresh
    (no --resume, or nothing saved yet)."""
    path = os.path.join(out, "train_state.safetensors")
    problems = []
    for candidate in (path, f"{path}.prev") if resume else ():
        if not os.path.exists(candidate):
            continue
        try:
            tensors, meta = load_checkpoint(candidate)
        except UsageError as err:
            problems.append(str(err))
            continue
        if problems:
            print(f"warning: {problems[0]}; resuming from the previous checkpoint", file=sys.stderr)
        return candidate, tensors, meta
    if problems:
        raise UsageError(f"no readable train state to resume from: {problems[0]}")
    return None


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


def file_digest(path: str) -> str:
    """sha256 of a file: ties a generator to the exact tokenizer it was trained on."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def generator_meta(config: MaskGITConfig, step: int, text: CaptionTokenizer, tokenizer_sha256: str) -> dict[str, str]:
    return {"format": "phenaki", "stage": "2", "kind": "maskgit", "config": json.dumps(dataclasses.asdict(config)),
            "step": str(step), "text_tokenizer": text.to_json(), "tokenizer_sha256": tokenizer_sha256}


def load_generator(path: str, tokenizer_path: str):
    """A stage-2 checkpoint and the tokenizer it was trained on -> (generator, caption tokenizer,
    stage-1 tokenizer, metadata), models in eval mode on the CPU."""
    tensors, meta = load_checkpoint(path)
    if meta.get("stage") != "2":
        raise UsageError(f"{path} holds a stage-{meta.get('stage')} model, not a stage-2 generator")
    tokenizer, _ = load_tokenizer(tokenizer_path)
    if file_digest(tokenizer_path) != meta["tokenizer_sha256"]:
        raise UsageError(f"{path} was trained on another tokenizer than {tokenizer_path} (sha256 differs)")
    model = MaskGIT(MaskGITConfig.from_dict(json.loads(meta["config"])))
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model.eval(), CaptionTokenizer.from_json(meta["text_tokenizer"]), tokenizer, meta


def whole(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Under FSDP a state dict holds shards (DTensors): gather each into the full tensor, on the CPU.
    A collective: every rank calls it, in the same order, but only a rank that will write (`keep`)
    holds on to the result, one tensor at a time being gathered. Plain tensors pass through."""
    out = {}
    for k, v in tensors.items():
        full = v.full_tensor() if isinstance(v, DTensor) else v
        if keep:
            out[k] = full.cpu()
    return out


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str, keep: bool = True) -> tuple[dict, str]:
    """Flatten an optimizer state into safetensors-friendly tensors plus JSON for the rest."""
    state = opt.state_dict()
    tensors = whole({f"{prefix}.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}, keep)
    return tensors, json.dumps(state["param_groups"])


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups_json: str, prefix: str) -> None:
    """The inverse of optimizer_tensors. Under FSDP each rank keeps its shard of a parameter's moments."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, i, name = key.split(".", 2)
            p = params[int(i)]
            if isinstance(p, DTensor) and name != "step":  # exp_avg, exp_avg_sq: shaped like the parameter
                value = distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            state.setdefault(int(i), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(groups_json)})


def save_weights(out: str, meta: dict[str, str], cfg: TrainConfig, weights: dict[str, torch.Tensor]) -> None:
    save_checkpoint(os.path.join(out, "model.safetensors"), weights,
                    meta | {"train_config": json.dumps(dataclasses.asdict(cfg))})


def save_run(out: str, meta: dict[str, str], cfg: TrainConfig, modules: dict[str, nn.Module],
             opts: dict[str, torch.optim.Optimizer], write: bool = True) -> None:
    """model.safetensors: the weights to sample with (the EMA's when there is one);
    train_state.safetensors: every module and optimizer, for --resume. Under FSDP every rank calls
    this (the shards are gathered first) and only the one with `write` writes."""
    states = {name: whole(m.state_dict(), write) for name, m in modules.items()}
    tensors = {f"{name}.{k}": v for name, state in states.items() for k, v in state.items()}
    groups = {}
    for name, opt in opts.items():
        opt_tensors, groups[f"{name}_groups"] = optimizer_tensors(opt, name, write)
        tensors |= opt_tensors
    if not write:
        return
    try:
        save_weights(out, meta, cfg, states.get("ema") or states["model"])
        save_checkpoint(os.path.join(out, "train_state.safetensors"), tensors, meta | groups)
    except OSError as err:  # a full disk: the previous checkpoint is intact; try again at the next save
        print(f"warning: checkpoint at step {meta['step']} not saved ({err}); the previous one is kept", file=sys.stderr)


def restore_modules(tensors: dict, modules: dict[str, nn.Module]) -> None:
    """The weights of save_run's train state, into modules not yet sharded."""
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})


def restore_optimizers(tensors: dict, meta: dict[str, str], opts: dict[str, torch.optim.Optimizer]) -> int:
    """The optimizer states of save_run's train state (after sharding, if any) -> the step to continue from."""
    for name, opt in opts.items():
        restore_optimizer(opt, tensors, meta[f"{name}_groups"], name)
    return int(meta["step"])


def write_log(out: str, history: list[dict], record: dict) -> None:
    history.append(record)
    try:
        with open(os.path.join(out, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:  # a full disk must not end a run: the checkpoints say whether they were saved
        print(f"warning: log line of step {record['step']} not written ({err.strerror})", file=sys.stderr)


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


def save_plots(out: str, history: list[dict], keys: tuple[str, ...], videos: torch.Tensor, name: str) -> None:
    """loss.png: the curves of `keys` so far; `name`: videos (B, 3, T, H, W) as a grid, one clip a row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.legend()
    grid = videos.permute(0, 3, 2, 4, 1).flatten(2, 3).flatten(0, 1)  # (B*H, T*W, 3)
    try:
        fig.savefig(os.path.join(out, "loss.png"), dpi=100, bbox_inches="tight")
        plt.imsave(os.path.join(out, name), ((grid.clamp(-1, 1) + 1) / 2).cpu().numpy())
    except OSError as err:  # a full disk must not end a run
        print(f"warning: loss.png or {name} not written ({err.strerror})", file=sys.stderr)
    finally:
        plt.close(fig)


def show_progress(step: int, cfg: TrainConfig, world: int, losses: dict, t0: float, start_step: int) -> None:
    """The progress line: step, losses, clips/s, time left. One updating line on a terminal."""
    tty = sys.stdout.isatty()
    if not tty and step % cfg.log_every:
        return
    elapsed = time.time() - t0
    rate = (step - start_step) * cfg.batch_size * cfg.grad_accum * world / elapsed
    eta = (cfg.max_steps - step) * elapsed / max(1, step - start_step)
    shown = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
    line = f"step {step}/{cfg.max_steps} | {shown} | {rate:.1f} clips/s | eta {int(eta) // 60}m{int(eta) % 60:02d}s"
    print(("\r" if tty else "") + line, end="" if tty else "\n", flush=True)


def grad_norm(model: nn.Module, clip: float) -> float:
    """Clip the gradients to a global norm of `clip` -> the norm before clipping (inf or NaN if any
    gradient is; the step is then skipped). Under FSDP the norm is a replicated DTensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


class TrainingStopped(Exception):
    """The run cannot go on (e.g. the loss diverged): reported as one line, exit code 1."""


class StepGuard:
    """What every step checks on all ranks at once, in one all-reduce: a non-finite loss (the update
    is skipped, the step still counts; ten in a row stop the run) and SIGTERM or Ctrl-C on any rank
    (the loop saves a checkpoint and leaves). Use as a context manager: it installs the handlers."""

    def __init__(self, device: torch.device):
        self.device, self.bad_in_a_row, self.skipped, self.stop = device, 0, 0, False
        self.signalled, self.previous = 0, {}  # signalled: the first signal's number

    def __enter__(self) -> "StepGuard":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def on_signal(self, signum: int, frame) -> None:
        if self.signalled and signum == signal.SIGINT:  # a second Ctrl-C: leave now
            raise KeyboardInterrupt
        self.signalled = self.signalled or signum

    def update_ok(self, loss: float) -> bool:
        """Is this step's loss (plus its gradient norm) finite on every rank? Also sets self.stop if
        any rank was signalled."""
        flags = torch.tensor([float(not math.isfinite(loss)), float(self.signalled > 0)], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, self.stop = bool(flags[0]), bool(flags[1])
        self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
        self.skipped += bad
        if self.bad_in_a_row >= 10:
            raise TrainingStopped("the loss was not finite 10 steps in a row; lower the learning rate "
                                  "and continue with --resume from the last checkpoint")
        return not bad


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def finish(model: nn.Module, world: int, master: bool, message: str, compare: bool = True) -> None:
    """End of a run: under DDP a cheap check that every rank's weights stayed in step (`compare`;
    FSDP ranks hold different shards by design)."""
    if world > 1:
        if compare:
            digests = [None] * world
            dist.all_gather_object(digests, weights_digest(model))
            if master:
                print(f"weights identical across {world} ranks: {len(set(digests)) == 1}")
        dist.barrier()  # leave together: a rank that tears down its process group early can abort the other
    if master:
        print(message)


def quiet_worker(worker: int) -> None:
    """DataLoader workers leave the process group, so that Ctrl-C or a SIGTERM sent to the group (as
    schedulers do) reaches only the main process, which saves and then stops them itself."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()


def leave_on_signal(step: int, world: int, master: bool, out: str, signum: int) -> None:
    """After SIGTERM or Ctrl-C: the checkpoint of this step is saved; leave together, with 128 + the
    signal (a rank that was not signalled itself says SIGTERM)."""
    if world > 1:
        dist.barrier()
    if master:
        print(f"\nstopped by a signal at step {step}; checkpoint saved in {out}: continue with --resume", flush=True)
    sys.exit(128 + (signum or signal.SIGTERM))


# ----------------------------------------------------------------------------- stage 1

def train_tokenizer(args, model_cfg, cfg: TrainConfig, source, rank: int, world: int, device: torch.device) -> None:
    master = rank == 0
    torch.manual_seed(cfg.seed)  # the same init on every rank
    model = TOKENIZERS[args.tokenizer][0](model_cfg).to(device)
    disc = Discriminator().to(device)
    if args.compile:
        compile_blocks(model)
    perceptual = None
    if args.perceptual_weights:
        perceptual = VGGPerceptual()
        perceptual.load_state_dict(load_file(args.perceptual_weights))
        perceptual = perceptual.to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay, fused=fused)
    opt_d = torch.optim.AdamW(disc.parameters(), cfg.lr, betas=(0.5, 0.9), weight_decay=cfg.weight_decay, fused=fused)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
    model_path = os.path.join(args.out, "model.safetensors")
    step = 0
    modules = {"model": model, "disc": disc} | ({"ema": ema} if ema is not None else {})
    opts = {"opt": opt, "opt_d": opt_d}
    resume = load_train_state(args.out, args.resume)
    if resume:
        _, tensors, meta = resume
        restore_modules(tensors, modules)
        step = restore_optimizers(tensors, meta, opts)
        if rank > 0:  # the saved counts are all ranks' sum (summed_counts): rank 0 carries it on
            model.quantizer.counts.zero_()
        if master:
            print(f"resumed from {resume[0]} at step {step}")
    ddp = world > 1
    # quantizer buffers hold per-rank usage counts: keep DDP from overwriting them with rank 0's
    model_d = DDP(model, forward_sync_buffers=False) if ddp else model
    disc_d = DDP(disc, forward_sync_buffers=False) if ddp else disc
    stream = ClipStream(source, cfg.batch_size, rank, world, start_batch=step * cfg.grad_accum)
    # a fixed batch to watch reconstructions on: unseen clips of the Shapes world, else the first batch (data with
    # nothing usable fails here, in this process, before any worker starts)
    shown = make_source("shapes", cfg.frames, cfg.image_size, seed=cfg.seed + 1) if cfg.data == "shapes" else source
    watch = ClipStream(shown, 8).batch(0)
    watch = watch["video"].to(device)
    # clips decode in `workers` processes, each keeping 4 batches ready, into pinned memory on CUDA
    loader = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers,
                                              pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                                              prefetch_factor=4 if cfg.workers else None, worker_init_fn=quiet_worker))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    # files the data set dropped while indexing or skipped while loading, for the log
    history, skipped_files, t0, start_step = [], getattr(source, "dropped", 0), time.time(), step

    with StepGuard(device) as guard:
        while step < cfg.max_steps:
            torch.manual_seed(cfg.seed * 1_000_003 + rank * 10_007 + step)  # RNG state is a function of the step
            for group in opt.param_groups + opt_d.param_groups:
                group["lr"] = lr_at(step, cfg)
            use_gan = step >= cfg.gan_start
            logs = {"rec": 0.0, "vq": 0.0, "gan": 0.0, "disc": 0.0}
            for micro in range(cfg.grad_accum):
                batch = next(loader)
                video, skipped_files = batch["video"].to(device, non_blocking=True), skipped_files + batch["skipped"]
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
            norm = grad_norm(model, cfg.grad_clip)  # an inf gradient under a finite loss is caught too
            if guard.update_ok(logs["rec"] + logs["vq"] + logs["gan"] + logs["disc"] + norm):
                opt.step()
                if use_gan:
                    opt_d.step()
                if ema is not None:
                    update_ema(ema, model, cfg.ema)
            opt.zero_grad(set_to_none=True), opt_d.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.restart_every == 0:
                logs["restarted"] = model.quantizer.restart_dead_codes()
            if master:
                show_progress(step, cfg, world, {k: logs[k] for k in ("rec", "vq", "gan", "disc")}, t0, start_step)
            if master and (step % cfg.log_every == 0 or step == cfg.max_steps):
                record = {"step": step, "lr": lr_at(step, cfg), "time": round(time.time() - t0, 1)} | logs | {
                    "skipped_steps": guard.skipped, "skipped_files": skipped_files}
                if step % cfg.image_every == 0 or step == cfg.max_steps:
                    was = model.training
                    model.eval()
                    with torch.no_grad(), autocast:
                        recon = model(watch).recon.float().clamp(-1, 1)
                    model.train(was)
                    record["val_psnr"] = (-10 * torch.log10(((recon - watch) / 2).pow(2).mean())).item()
                    real_over_fake = torch.stack([watch[:4], recon[:4]], dim=1).flatten(0, 1)  # (8, 3, T, H, W)
                    save_plots(args.out, history + [record], ("rec", "vq", "val_psnr"), real_over_fake, "recon.png")
                write_log(args.out, history, record)
            if step % cfg.save_every == 0 or step == cfg.max_steps or guard.stop:
                with summed_counts(model.quantizer, ddp):  # every rank joins the sum
                    if master:
                        save_run(args.out, tokenizer_meta(args.tokenizer, model_cfg, step), cfg, modules, opts)
            if guard.stop:
                leave_on_signal(step, world, master, args.out, guard.signalled)
    finish(model, world, master, f"done: {step} steps in {time.time() - t0:.0f} s; weights in {model_path}")
    if master and cfg.merge_codes:  # model.safetensors only: train_state keeps the raw book for --resume
        sampled = ema if ema is not None else model
        left = merge_codes(sampled, source, cfg, device)
        save_weights(args.out, tokenizer_meta(args.tokenizer, model_cfg, step) | {"codes_left": str(left)}, cfg,
                     sampled.state_dict())
        print(f"merged near-duplicate codes (cosine >= {cfg.merge_codes}): {left} of {model_cfg.codebook_size} left")


@contextlib.contextmanager
def summed_counts(quantizer: nn.Module, ddp: bool):
    """Code-use counts are kept per rank and summed only at each dead-code restart, so a checkpoint
    taken between restarts holds all ranks' sum for the duration of the save; on resume rank 0
    restores it and the others start from zero, and the next restart sees the same total."""
    if not ddp:
        yield
        return
    local = quantizer.counts.clone()
    dist.all_reduce(quantizer.counts)
    try:
        yield
    finally:
        quantizer.counts.copy_(local)


def merge_codes(model: nn.Module, source, cfg: TrainConfig, device: torch.device, clips: int = 512) -> int:
    """Count the codes that `clips` training clips use, then fold near-duplicates into the most used
    code of each group (VectorQuantizer.merge_near_duplicates). -> the number of codes left."""
    usage = torch.zeros_like(model.quantizer.counts)
    stream = ClipStream(source, cfg.batch_size)
    model.eval()
    with torch.no_grad():
        for b in range(math.ceil(clips / cfg.batch_size)):
            codes = model.encode(stream.batch(b)["video"].to(device))  # (B, t, h, w)
            usage += torch.bincount(codes.flatten(), minlength=usage.numel())
    return model.quantizer.merge_near_duplicates(usage, cfg.merge_codes)


# ----------------------------------------------------------------------------- stage 2

def shard(root: nn.Module, device: torch.device) -> None:
    """FSDP2: each transformer block of the generator and of its text encoder becomes a unit whose
    parameters, gradients and AdamW moments are split across the ranks and all-gathered only while
    the block runs; the rest (embeddings, head) forms the root's unit. On CUDA the all-gathers move
    bf16 and the gradients are reduced in fp32."""
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for module in root.modules():
        if isinstance(module, Block):
            fully_shard(module, mp_policy=mixed)
    fully_shard(root, mp_policy=mixed)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile where the work is: each transformer block of a generator (the unit FSDP shards
    too), or a tokenizer's whole forward. In place: parameter names and checkpoints do not change."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks if isinstance(model, MaskGIT) else [model]:
        block.compile()


class Run(nn.Module):
    """Routes a method of the generator through forward, where DDP's and FSDP's hooks see it:
    Run(model)("loss", ...) is a training step's loss, Run(model).generate(...) samples (under FSDP
    with each unit's parameters gathered as it runs)."""

    def __init__(self, model: MaskGIT):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)

    def generate(self, *args, **kwargs) -> torch.Tensor:
        return self("generate", *args, **kwargs)


def watch_specs(n: int, seed: int) -> list:
    rng = np.random.default_rng([seed, 424242])
    return [random_spec(rng) for _ in range(n)]


@torch.no_grad()
def sample_and_judge(model: MaskGIT, text: CaptionTokenizer, tokenizer, specs: list, device, **sampling):
    """Generate one clip per spec from its canonical caption -> (videos (B, 3, T, H, W), mean oracle verdicts)."""
    ids, mask = text.encode([caption(s) for s in specs], model.config.text.max_len)
    codes = model.generate(ids.to(device), mask.to(device), **sampling)
    videos = tokenizer.decode(codes).float().cpu()
    verdicts = [agreement(v, s) for v, s in zip(videos, specs)]
    return videos, {k: float(np.mean([v[k] for v in verdicts])) for k in verdicts[0]}


def train_generator(args, model_cfg: MaskGITConfig, cfg: TrainConfig, source, rank: int, world: int,
                    device: torch.device) -> None:
    master, ddp = rank == 0, world > 1
    tokenizer, _ = load_tokenizer(args.tokenizer_checkpoint)
    tokenizer = tokenizer.to(device)
    digest = file_digest(args.tokenizer_checkpoint)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model_path = os.path.join(args.out, "model.safetensors")

    # 1. the token cache: every clip through the frozen encoder once, each rank its share
    key = json.dumps([digest, cfg.data, cfg.frames, cfg.image_size, cfg.fps, cfg.cache_clips, cfg.seed])
    t0 = time.time()

    def encode(video: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast:
            return tokenizer.encode(video.to(device))

    def shown(b: int, total: int) -> None:
        if master and (b % 50 == 0 or b == total):
            print(f"token cache: batch {b}/{total}, {time.time() - t0:.0f} s", flush=True)

    folder = os.path.join(args.out, "token_cache")
    build_token_cache(encode, source, cfg.cache_clips, folder, 32, rank, world, key, on_batch=shown)
    if ddp:
        dist.barrier()
    codes, captions, skipped_files = load_token_cache(folder, world, key)  # (N, t, h, w), N captions
    skipped_files += getattr(source, "dropped", 0)

    # 2. the caption tokenizer: trained on the cached captions by rank 0, or restored on resume
    resume = load_train_state(args.out, args.resume)
    if resume:
        _, tensors, meta = resume
        text_json = meta["text_tokenizer"]
    else:
        text_json = [CaptionTokenizer.train(captions, model_cfg.text.vocab_size).to_json() if master else None]
        if ddp:
            dist.broadcast_object_list(text_json)
        text_json = text_json[0]
    text = CaptionTokenizer.from_json(text_json)
    all_ids, all_masks = text.encode(captions, model_cfg.text.max_len)  # (N, L) each, tokenized once

    # 3. the generator: the same init on every rank, restored whole, then sharded (FSDP) or replicated (DDP)
    torch.manual_seed(cfg.seed)
    model = MaskGIT(model_cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema else None
    modules = {"model": model} | ({"ema": ema} if ema is not None else {})
    if resume:
        restore_modules(tensors, modules)
    if master:
        params = sum(p.numel() for p in model.parameters())
        print(f"generator: {params / 1e6:.2f}M parameters; cache: {len(codes)} clips of {tuple(codes.shape[1:])} codes; "
              f"captions: {text.vocab_size} BPE tokens")
    if args.compile:
        compile_blocks(model)
    fsdp = args.fsdp
    run = Run(model)
    sampler = Run(ema) if ema is not None else run  # what samples the check grid
    if fsdp:
        shard(run, device)
        if ema is not None:
            shard(sampler, device)
    loss_d = DDP(run) if ddp and not fsdp else run
    # the optimizer comes after sharding: under FSDP it holds each rank's shards
    opt = torch.optim.AdamW(model.parameters(), cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    step, opts = 0, {"opt": opt}
    if resume:
        step = restore_optimizers(tensors, meta, opts)
        if master:
            print(f"resumed from {resume[0]} at step {step}")
    specs = watch_specs(8, cfg.seed)
    history, t0, start_step = [], time.time(), step
    t = model_cfg.latent_frames

    with StepGuard(device) as guard:
        while step < cfg.max_steps:
            seed = cfg.seed * 1_000_003 + rank * 10_007 + step  # RNG state and batch are functions of the step
            torch.manual_seed(seed)
            pick = torch.Generator().manual_seed(seed)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            total = 0.0
            for micro in range(cfg.grad_accum):
                idx = torch.randint(len(codes), (cfg.batch_size,), generator=pick)  # with replacement
                mask = all_masks[idx]
                width = int(mask.sum(1).max())  # trim the padding this batch does not need
                ids, mask = all_ids[idx, :width].to(device), mask[:, :width].to(device)
                frames = None
                if cfg.image_ratio > 0:  # by causality an image's codes are its clip's first latent frame
                    image = torch.rand(cfg.batch_size, generator=pick) < cfg.image_ratio
                    frames = torch.where(image, 1, t).to(device)
                last = micro == cfg.grad_accum - 1
                if fsdp:
                    loss_d.set_requires_gradient_sync(last)
                with (loss_d.no_sync() if ddp and not fsdp and not last else contextlib.nullcontext()), autocast:
                    loss = loss_d("loss", codes[idx].to(device), ids, mask, frames)
                    (loss / cfg.grad_accum).backward()
                total += loss.item() / cfg.grad_accum
            if guard.update_ok(total + grad_norm(model, cfg.grad_clip)):
                opt.step()
                if ema is not None:
                    update_ema(ema, model, cfg.ema)
            opt.zero_grad(set_to_none=True)
            step += 1
            if master:
                show_progress(step, cfg, world, {"loss": total}, t0, start_step)
            judge = step % cfg.image_every == 0 or step == cfg.max_steps
            if judge and (master or fsdp):  # under FSDP every rank joins the sampling's all-gathers
                model.eval()
                videos, verdicts = sample_and_judge(sampler, text, tokenizer, specs, device, steps=cfg.sample_steps,
                                                    generator=torch.Generator(device).manual_seed(cfg.seed))
                model.train()
                if fsdp:  # FSDP keeps a root unit gathered after its forward: shard it again before updates
                    sampler.reshard()
            if master and (step % cfg.log_every == 0 or step == cfg.max_steps):
                record = {"step": step, "lr": lr_at(step, cfg), "time": round(time.time() - t0, 1), "loss": total,
                          "skipped_steps": guard.skipped, "skipped_files": skipped_files}
                if judge:
                    record |= {f"val_{k}": v for k, v in verdicts.items()}
                    save_plots(args.out, history + [record], ("loss",), videos, "samples.png")
                write_log(args.out, history, record)
            if (master or fsdp) and (step % cfg.save_every == 0 or step == cfg.max_steps or guard.stop):
                save_run(args.out, generator_meta(model_cfg, step, text, digest), cfg, modules, opts, write=master)
            if guard.stop:
                leave_on_signal(step, world, master, args.out, guard.signalled)
    finish(model, world, master, f"done: {step} steps in {time.time() - t0:.0f} s; weights in {model_path}",
           compare=not fsdp)


# ----------------------------------------------------------------------------- entry point

def check_generator(args, model_cfg: MaskGITConfig, cfg: TrainConfig) -> MaskGITConfig:
    """Stage 2 needs a tokenizer, and the generator's vocabulary and window must match it."""
    if not args.tokenizer_checkpoint:
        raise UsageError("stage 2 needs --tokenizer-checkpoint PATH (a stage-1 model.safetensors)")
    tokenizer, meta = load_tokenizer(args.tokenizer_checkpoint)
    K = tokenizer.quantizer.codebook.shape[0]
    if model_cfg.codebook_size != K:
        raise UsageError(f"the generator's vocabulary ({model_cfg.codebook_size}) must equal the tokenizer's "
                         f"codebook size ({K}); pass --set model.codebook_size={K}")
    trained = json.loads(meta.get("train_config", "{}"))
    if trained.get("image_size", cfg.image_size) != cfg.image_size:
        raise UsageError(f"the tokenizer was trained at {trained['image_size']} pixels, stage 2 asks for {cfg.image_size}")
    if not 0 <= cfg.image_ratio <= 1:
        raise UsageError(f"--image-ratio must lie in [0, 1], got {cfg.image_ratio}")
    # the window: 1 + 2n frames are 1 + n latent frames of (size / 8)^2 codes
    return dataclasses.replace(model_cfg, latent_frames=1 + (cfg.frames - 1) // 2, grid=cfg.image_size // 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a Phenaki stage: 1 = video tokenizer, 2 = MaskGIT generator.")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True)
    p.add_argument("--tokenizer", default="vqgan", help="vqgan (default, the shipped one) or cvivit (the paper's)")
    p.add_argument("--tokenizer-checkpoint", help="the frozen stage-1 model (stage 2)")
    p.add_argument("--data", help="shapes (default), a video folder, tar shards, or an image folder")
    p.add_argument("--preset", default="tiny", help="tiny, base or paper")
    p.add_argument("--out", help="output folder (default runs/stage<N>-<tokenizer>-<preset>)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--resume", action="store_true", help="continue from <out>/train_state.safetensors")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field: model.<field>=... or train.<field>=...")
    p.add_argument("--image-ratio", type=float, help="stage 2: share of samples trained as images")
    p.add_argument("--perceptual-weights", help="VGG16 weights (.safetensors) to switch on the perceptual loss")
    p.add_argument("--fsdp", action="store_true",
                   help="stage 2 under torchrun: shard the generator across ranks (FSDP2) instead of replicating it (DDP)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (bench.py --compile measures whether it pays on your device)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        unknown = [s for s in args.set if not s.startswith(("model.", "train."))]
        if unknown:
            raise UsageError(f"unknown config key {unknown[0]!r}: keys start with model. or train.")
        if args.stage == 1:
            model_cfg, cfg = preset(args.preset, args.tokenizer)
        else:
            model_cfg, cfg = generator_preset(args.preset)
            if args.image_ratio is not None:
                cfg = dataclasses.replace(cfg, image_ratio=args.image_ratio)
        model_cfg, cfg = override(model_cfg, args.set, "model"), override(cfg, args.set, "train")
        if args.data:
            cfg = dataclasses.replace(cfg, data=args.data)
        if args.max_steps:
            cfg = dataclasses.replace(cfg, max_steps=args.max_steps)
        if cfg.frames % 2 == 0:
            raise UsageError(f"train.frames must be 1 + 2n, got {cfg.frames}")
        if args.fsdp and (args.stage != 2 or "RANK" not in os.environ):
            raise UsageError("--fsdp shards the stage-2 generator across the processes of torchrun; "
                             "stage 1 and single-process runs use DDP or nothing")
        if args.stage == 2:
            model_cfg = check_generator(args, model_cfg, cfg)
        name = args.tokenizer if args.stage == 1 else "maskgit"
        args.out = args.out or f"runs/stage{args.stage}-{name}-{args.preset}"
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot write to --out {args.out}: {err.strerror}") from None
        if not os.access(args.out, os.W_OK):
            raise UsageError(f"cannot write to --out {args.out}: not a writable folder")
        # torchrun --max-restarts re-runs this command after a worker dies: go on from the last checkpoint
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        args.resume = args.resume or restarts > 0
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
        backend = "nccl" if device.type == "cuda" else "gloo"
        if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # a restarted worker group meets in the store of the failed one: under a fresh key prefix,
            # so that it cannot read the dead workers' addresses
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
            dist.init_process_group(backend, store=dist.PrefixStore(f"restart-{restarts}", store), rank=rank,
                                    world_size=world)
        else:
            dist.init_process_group(backend)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    code = 0
    try:
        (train_tokenizer if args.stage == 1 else train_generator)(args, model_cfg, cfg, source, rank, world, device)
    except (UsageError, UnusableData) as err:  # a --resume with nothing readable; data with nothing usable
        # raised in a DataLoader worker, the message carries the worker's traceback: its last line is the error
        print(f"error: {str(err).strip().splitlines()[-1].removeprefix('data.UnusableData: ')}", file=sys.stderr)
        code = 2
    except TrainingStopped as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    except SystemExit as stop:  # leave_on_signal
        code = stop.code
    finally:
        if ddp:
            dist.destroy_process_group()
    if ddp:  # leave before C++ teardown, where torch 2.13's distributed threads at times abort the exit
        # (SIGABRT after a finished run, seen under torchrun on 2 busy CPU cores)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
