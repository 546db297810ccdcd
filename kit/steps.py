"""
What every training step does around its loss, written once for both stages of train.py.

A step of either stage is: seed, compute the loss and its gradients (the stage's own code), then the
same update. `Steps` holds the step counter and does the shared parts:
  begin     seed torch's RNG from (seed, rank, step), so that a resumed run draws the same masks,
            picks and noise as one that never stopped, and set the learning rate of the schedule
  update    clip the gradients to a global norm; unless the loss or the norm is non-finite on some
            rank (faults.StepGuard), step the optimizers and the EMA; clear the gradients; count the
            step; redraw the progress line (step, losses, clips/s, time left)
  due       whether this step is a multiple of an interval, or the last one (log, save, validate)
  write_log one line of log.jsonl (progress.RunLog): step, lr, time, losses, figures, skipped steps/files

The schedule (`lr_at`) is a linear warm-up over `warmup` steps, then a cosine from lr down to min_lr
at max_steps, as in the paper's tokenizer training. The optimizer (`adamw`) is AdamW with decoupled
weight decay, β2 from the config (0.99 in the paper), fused on CUDA. The EMA keeps e = decay·e + (1
- decay)·p after every update; when it is on, it is what model.safetensors holds.

bf16 autocast on CUDA, fp32 on the CPU (`train.precision`): on CPUs without bf16 instructions bf16
matmuls run hundreds of times slower; on one with AVX-512 BF16 "bf16" ran the generator step faster.
"""

import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from kit.config import TrainConfig
from kit.faults import StepGuard
from kit.progress import Progress, RunLog


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# layers whose weight matrices take weight decay
DECAYED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def adamw(model: nn.Module, cfg: TrainConfig, beta1: float = 0.9) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices of linear and conv layers only (group 0), as
    the references do: not on biases, norms, embeddings, position tables, [MASK], the learned first
    frame or the codebook (group 1), which decay would pull toward zero for no gain in
    generalisation."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, DECAYED)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, cfg.lr, betas=(beta1, cfg.beta2),
                             # the fused kernel exists on CUDA only
                             fused=params[0].is_cuda)


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        # e = decay·e + (1 - decay)·p
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Scale the gradients to a global norm of at most `max_norm` -> the norm before clipping (inf
    or NaN if any gradient is). Under FSDP the norm is a replicated DTensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one rank's step: a hash of the whole tuple (seed, rank, step) by numpy's
    SeedSequence, 63 bits. A sum such as seed·a + rank·b + step would repeat itself: rank r at step
    s would draw what rank 0 draws at step s + b·r, the same batch and the same masks."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class Steps:
    """What both loops do around their loss, written once: the step counter, its seed and learning
    rate, the guarded update, the progress line and the log. `guard` is entered by the loop."""

    def __init__(self, cfg: TrainConfig, out: str, rank: int, world: int, device: torch.device,
                 step: int, skipped_files: int):
        self.cfg = cfg
        self.rank = rank
        self.world = world
        self.master = rank == 0
        # files the data set dropped or skipped so far
        self.step = step
        self.skipped_files = skipped_files
        # bf16 autocast on CUDA; on the CPU only when asked, where it is fast on some CPUs alone
        self.autocast = contextlib.nullcontext()
        if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
            self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        self.guard = StepGuard(device)
        self.progress = Progress(cfg.max_steps, "step", start=step)
        self.log = RunLog(out, start=step)

    def begin(self, opts: list[torch.optim.Optimizer]) -> torch.Generator:
        """Seed this step's draws from (seed, rank, step) and set the lr -> a generator for
        batch picks."""
        seed = step_seed(self.cfg.seed, self.rank, self.step)
        torch.manual_seed(seed)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr_at(self.step, self.cfg)
        return torch.Generator().manual_seed(seed)

    def update(self, losses: dict[str, float], model: nn.Module, opts: list, stepped: list,
               ema: nn.Module | None) -> None:
        """Clip; unless the loss or the gradient norm is non-finite on a rank, step the optimizers
        in `stepped` and the EMA; clear every gradient; count the step and show it."""
        # an inf gradient under a finite loss is caught too
        norm = clip_gradients(model, self.cfg.grad_clip)
        if self.guard.step_is_finite(sum(losses.values()), norm):
            for opt in stepped:
                opt.step()
            if ema is not None:
                update_ema(ema, model, self.cfg.ema)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        if self.master:
            clips = (self.step - self.progress.start) * self.cfg.batch_size * self.cfg.grad_accum * self.world
            text = " ".join(f"{k} {v:.4f}" for k, v in losses.items())
            self.progress.update(self.step,
                                 f"{text} | {clips / self.progress.elapsed():.1f} clips/s")

    def due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.cfg.max_steps

    def write_log(self, losses: dict, figures: dict) -> None:
        line = {"step": self.step, "lr": lr_at(self.step, self.cfg),
                "time": round(self.progress.elapsed(), 1)}
        skipped = {"skipped_steps": self.guard.skipped, "skipped_files": self.skipped_files}
        self.log.write(line | losses | figures | skipped)
