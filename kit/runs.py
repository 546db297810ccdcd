"""
A training run: what a train.py command asks for, checked before any process group exists (`setup`),
and the run's folder: what train.py saves there, what --resume continues from, and what --force
replaces.

A run writes model.safetensors (the weights to sample with, checkpoint.py's format) and
train_state.safetensors: every module (model, discriminator, EMA) as `<name>.<key>` and every
optimizer's moments as `<name>.<param index>.<key>`, the param groups as JSON in the metadata. Both
are written atomically, with the previous file kept as `.prev` (checkpoint.save_checkpoint), and a
resume falls back to the `.prev` train state when the newest one is unreadable.

Under FSDP2 a state dict holds shards (DTensors): `whole` gathers them, so that the files are the
same as under DDP or in one process, and `restore_optimizer` shards the moments again on load.
"""

import dataclasses
import json
import os
import shutil
import sys
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import safe_open
from torch.distributed.tensor import DTensor, distribute_tensor

from data import train_and_val
from kit.checkpoint import (TOKENIZERS, check_indices, check_model_config, check_pairing,
                            check_tensors, checked_config, checked_train, file_digest,
                            generator_config_for, init_config, load_checkpoint, model_bounds,
                            read_header, save_checkpoint, tokenizer_config, train_limits)
from kit.config import TrainConfig, configure, override, resume_changes
from kit.distributed import check_device
from kit.faults import UsageError
from kit.outputs import same_file, written_by
from maskgit import MaskGITConfig


def whole(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Under FSDP a state dict holds shards (DTensors): gather each into the full tensor, on
    the CPU. A collective: every rank calls it, in the same order, but only a rank that will
    write (`keep`) holds on to the result, one tensor at a time being gathered. Plain tensors
    pass through."""
    out = {}
    for k, v in tensors.items():
        full = v.full_tensor() if isinstance(v, DTensor) else v
        if keep:
            out[k] = full.cpu()
    return out


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str, keep: bool = True) -> tuple[dict, str]:
    """Flatten an optimizer state into safetensors-friendly tensors plus JSON for the rest."""
    state = opt.state_dict()
    flat = {}
    for i, moments in state["state"].items():
        flat |= {f"{prefix}.{i}.{k}": v for k, v in moments.items()}
    tensors = whole(flat, keep)
    return tensors, json.dumps(state["param_groups"])


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups_json: str, prefix: str,
                      path: str = "the train state") -> None:
    """The inverse of optimizer_tensors, each moment and group checked against the optimizer first.
    Under FSDP each rank keeps its shard of a parameter's moments."""
    params = []
    for group in opt.param_groups:
        params += group["params"]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            i, _, name = key[len(prefix) + 1:].partition(".")
            if not i.isdigit() or int(i) >= len(params) or name not in ("step", "exp_avg", "exp_avg_sq"):
                raise UsageError(f"{path}: {key[:60]} is no state of the {prefix} optimizer")
            p = params[int(i)]
            if name != "step" and list(value.shape) != list(p.shape):
                raise UsageError(f"{path}: {key} is {tuple(value.shape)}, its parameter {tuple(p.shape)}")
            if isinstance(p, DTensor) and name != "step":
                # exp_avg, exp_avg_sq: shaped like the parameter
                value = distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh,
                                          p.placements)
            state.setdefault(int(i), {})[name] = value
    try:
        groups = json.loads(groups_json)
        sizes = [len(g["params"]) for g in groups]
    except (json.JSONDecodeError, TypeError, KeyError):
        raise UsageError(f"{path}: the {prefix} optimizer's groups are not readable") from None
    if len(groups) != len(opt.param_groups):
        raise UsageError(f"the {prefix} state was saved with {len(groups)} parameter group(s), this phenaki makes "
                         f"{len(opt.param_groups)} (weight decay on matrices only): resume it with the phenaki "
                         "version that saved it")
    if sizes != [len(g["params"]) for g in opt.param_groups]:
        raise UsageError(f"{path}: the {prefix} optimizer's groups hold {sizes} parameters, the model's "
                         f"{[len(g['params']) for g in opt.param_groups]}")
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_weights(out: str, meta: dict[str, str], cfg: TrainConfig,
                 weights: dict[str, torch.Tensor]) -> None:
    """<out>/model.safetensors: the weights with the model and train configs in the metadata."""
    save_checkpoint(os.path.join(out, "model.safetensors"), weights,
                    meta | {"train_config": json.dumps(dataclasses.asdict(cfg))})


def save_run(out: str, meta: dict[str, str], cfg: TrainConfig, modules: dict[str, nn.Module],
             opts: dict[str, torch.optim.Optimizer], write: bool = True) -> None:
    """model.safetensors: the weights to sample with (the EMA's when there is one);
    train_state.safetensors: every module and optimizer, for --resume. Under FSDP every rank calls
    this (the shards are gathered first) and only the one with `write` writes. A failed write
    (a full disk) keeps the previous checkpoint and says so: the next save tries again."""
    states = {name: whole(m.state_dict(), write) for name, m in modules.items()}
    tensors = {}
    for name, state in states.items():
        tensors |= {f"{name}.{k}": v for k, v in state.items()}
    groups = {}
    for name, opt in opts.items():
        opt_tensors, groups[f"{name}_groups"] = optimizer_tensors(opt, name, write)
        tensors |= opt_tensors
    if not write:
        return
    try:
        save_weights(out, meta, cfg, states.get("ema") or states["model"])
        save_checkpoint(os.path.join(out, "train_state.safetensors"), tensors,
                        meta | groups | {"train_config": json.dumps(dataclasses.asdict(cfg))})
    except OSError as err:
        print(f"warning: checkpoint at step {meta['step']} not saved ({err}); the previous one is kept", file=sys.stderr)


# what --resume reads; model.safetensors alone cannot be resumed
STATE = "train_state.safetensors"


def saved_run(out: str) -> dict[str, str] | None:
    """The metadata of the run saved in `out` (its train state, else its model), read from the file
    header alone; {} for files that cannot be read; None when `out` holds no run."""
    files = (STATE, STATE + ".prev", "model.safetensors")
    for name in files:
        path = os.path.join(out, name)
        if os.path.isfile(path):
            try:
                with safe_open(path, framework="pt") as f:
                    return f.metadata() or {}
            except (SafetensorError, OSError):
                # a torn file still means that a run is there
                continue
    return {} if any(os.path.exists(os.path.join(out, name)) for name in files) else None


def resume_point(out: str) -> tuple[str | None, dict[str, str], list[str]]:
    """What --resume continues from: the newest readable of <out>/train_state.safetensors and the
    .prev kept beside it -> (its path or None, its metadata, what was wrong with the newer ones).
    The configs and the weights both come from this one file."""
    problems = []
    for path in (os.path.join(out, STATE), os.path.join(out, STATE + ".prev")):
        if os.path.exists(path):
            try:
                return path, read_header(path)[0], problems
            except UsageError as err:
                problems.append(str(err))
    return None, {}, problems


def saved_configs(meta: dict[str, str], where: str = "the saved run") -> tuple[object, TrainConfig]:
    """The model and train configs a run saved with its checkpoint, checked -> (model config,
    TrainConfig)."""
    model_cfg = (checked_config(MaskGITConfig, meta.get("config"), f"{where}: config", model_bounds("maskgit"))
                 if meta.get("stage") == "2" else tokenizer_config(meta.get("kind"), meta.get("config"), where))
    return model_cfg, checked_train(meta.get("train_config"), f"{where}: train_config")


class Continued(NamedTuple):
    """What resumed_run found in --out."""
    # the train state to continue from; None: a fresh start
    path: str | None = None
    # the saved (model config, TrainConfig); None: from the flags (a fresh start, or an older run)
    configs: tuple | None = None
    # stage 1: the saved tokenizer kind; stage 2: the tokenizer file it trains behind
    tokenizer: str | None = None
    # a fresh start over a run that --force replaces
    replace: bool = False


def resumed_run(args, out: str) -> Continued:
    """Whether this command may use `out` (its --out), and what it continues there. A fresh start
    in a folder that holds a run needs --force; --resume needs a readable train state."""
    meta = saved_run(out)
    # torchrun resumes by itself
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if meta is not None and not (args.resume or restarted):
        if not args.force:
            raise UsageError(f"{out} already holds a run (step {meta.get('step', '?')}): add --resume to "
                             "continue it, or --force to start a new one there")
        # setup removes the old run's files once everything else is accepted
        return Continued(replace=True)
    if meta is None:
        if args.resume and not restarted:
            raise UsageError(f"nothing to resume in {out}: it holds no checkpoint; leave out --resume to start a run")
        return Continued()
    path, meta, problems = resume_point(out)
    if path is None:
        # model.safetensors alone: resuming would start afresh and overwrite it
        raise UsageError(f"--resume needs {os.path.join(out, STATE)} (the optimizer and the step): "
                         + (f"no readable train state to resume from ({problems[0]})" if problems else "it is missing")
                         + "; start a new run in another --out")
    if problems:
        print(f"warning: {problems[0]}; resuming from {path}", file=sys.stderr)
    if "train_config" not in meta:
        return Continued(path)
    if meta.get("stage") != str(args.stage):
        raise UsageError(f"{out} holds a stage-{meta.get('stage')} run; this command is --stage {args.stage}")
    if args.stage == 1:
        if meta.get("kind") not in TOKENIZERS:
            raise UsageError(f"{path}: unknown tokenizer kind {str(meta.get('kind'))[:40]!r}")
        return Continued(path, saved_configs(meta, path), meta["kind"])
    tokenizer = args.tokenizer_checkpoint or meta.get("tokenizer_checkpoint")
    # other codes: the cache and the generator would no longer mean the same
    if os.path.isfile(tokenizer or "") and file_digest(tokenizer) != meta.get("tokenizer_sha256"):
        raise UsageError(f"{tokenizer} is not the tokenizer this run trained behind (sha256 "
                         f"differs from the one saved in {path}); resume with that tokenizer")
    return Continued(path, saved_configs(meta, path), tokenizer)


# what a run writes in --out
RUN_FILES = ("model.safetensors", "train_state.safetensors", "log.jsonl")


def run_paths(out: str) -> list[str]:
    """The files a run in `out` writes and --force removes: RUN_FILES and the side files of their
    atomic writes (outputs.written_by: `.tmp`, the `.prev` copy kept beside each)."""
    paths = []
    for name in RUN_FILES:
        paths += written_by(os.path.join(out, name))
    return paths


def check_inputs_outside(out: str, inputs: dict[str, str | None]) -> None:
    """Refuse a run whose input files ({flag: path}) are among the files it would write or remove in
    `out`: --force would delete them, and the first checkpoint would replace them."""
    cache = os.path.abspath(os.path.join(out, "token_cache"))
    for flag, path in inputs.items():
        if not path:
            continue
        inside_cache = os.path.commonpath([cache, os.path.abspath(path)]) == cache
        if inside_cache or any(same_file(path, written) for written in run_paths(out)):
            raise UsageError(f"{flag} {path} is a file the run in --out {out} writes or removes: "
                             "move it, or give another --out")


# the run folders this process writes: {folder: its open lock file}
LOCKS = {}


def lock_run(out: str) -> None:
    """Hold <out>/run.lock until release_run, so that a second train.py writing the same folder is
    refused: two runs there log every step twice and race on each save's `.tmp`. The operating
    system lets the lock go with the process, however it ends."""
    folder = os.path.realpath(out)
    if folder in LOCKS or os.name != "posix":
        return
    # POSIX only, as the lock is
    import fcntl
    lock = open(os.path.join(folder, "run.lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise UsageError(f"--out {out} is in use by another train.py (it holds {out}/run.lock): "
                         "wait for that run to end, or give another --out") from None
    LOCKS[folder] = lock


def release_run(out: str | None) -> None:
    """Let another run write `out` (train.py's last act; a process may train there again)."""
    lock = LOCKS.pop(os.path.realpath(out), None) if out else None
    if lock is not None:
        lock.close()


def clear_run(out: str) -> None:
    """Remove a run's checkpoints (and the copies kept beside them), its log and its token cache:
    what --force replaces."""
    for path in run_paths(out):
        if os.path.exists(path):
            os.remove(path)
    # stage 2's codes of the old run's data
    shutil.rmtree(os.path.join(out, "token_cache"), ignore_errors=True)


class TrainState(NamedTuple):
    """A checkpoint read whole (--resume's train state, --init's generator): where it was read from,
    its tensors and its metadata."""
    path: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]


def load_train_state(path: str | None) -> TrainState | None:
    """The train state resumed_run chose (resume_point), or --init's generator; None: none."""
    if path is None:
        return None
    tensors, meta = load_checkpoint(path)
    return TrainState(path, tensors, meta)


def restore_modules(tensors: dict, modules: dict[str, nn.Module],
                    path: str = "the train state") -> None:
    """The weights of save_run's train state, into modules not yet sharded, each checked first."""
    shapes = {}
    for k, v in tensors.items():
        shapes[k] = (list(v.shape), "F32" if v.is_floating_point() else "I64")
    check_indices(path, tensors)
    for name, m in modules.items():
        check_tensors(path, m, shapes, name + ".")
        prefix = name + "."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def restore_optimizers(tensors: dict, meta: dict[str, str], opts: dict[str, torch.optim.Optimizer],
                       path: str = "the train state") -> int:
    """The optimizer states of save_run's train state (after sharding, if any) -> the step to
    continue from."""
    for name, opt in opts.items():
        if f"{name}_groups" not in meta:
            raise UsageError(f"{path}: the {name} optimizer's groups are missing")
        restore_optimizer(opt, tensors, meta[f"{name}_groups"], name, path)
    return int(meta["step"])


class RunPlan(NamedTuple):
    """What setting up a train.py command decided, before any process group exists."""
    # the run folder
    out: str
    # stage 1: the tokenizer kind (vqgan, cvivit); stage 2: "maskgit"
    kind: str
    # the model's config and the training config
    model_cfg: object
    cfg: TrainConfig
    # the training clips and the held-out ones (None where none load)
    source: object
    val_source: object
    # the train state to continue from; None: a fresh start
    resume_from: str | None
    # stage 2: the frozen tokenizer file, and a generator file to fine-tune (--init)
    tokenizer_checkpoint: str | None
    init: str | None


def setup(args) -> RunPlan:
    """Everything that can be refused before a process group exists -> the plan of the run. A
    mistake raises UsageError or ValueError; once all is accepted the folder is locked (rank 0) and,
    under --force, cleared of the old run."""
    image_ratio = [f"train.image_ratio={args.image_ratio}"] if args.image_ratio is not None else []
    asked = args.set + image_ratio
    out = args.out or f"runs/stage{args.stage}-{args.tokenizer if args.stage == 1 else 'maskgit'}-{args.preset}"
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {args.max_steps}")
    check_device(args.device, gpus="RANK" not in os.environ)
    # the saved configs when this command continues a run
    continued = resumed_run(args, out)
    kind = args.tokenizer if args.stage == 1 else "maskgit"
    tokenizer_checkpoint = args.tokenizer_checkpoint
    if continued.tokenizer is not None and args.stage == 1:
        kind = continued.tokenizer
    elif continued.tokenizer is not None:
        tokenizer_checkpoint = continued.tokenizer
    check_inputs_outside(out, {"--tokenizer-checkpoint": tokenizer_checkpoint,
                               "--perceptual-weights": args.perceptual_weights,
                               "--watch-prompts": args.watch_prompts,
                               "--init": args.init})
    model_cfg, cfg = configure(args.stage, args.preset, kind, asked, args.max_steps)
    saved = continued.configs
    if saved:
        model_cfg = override(saved[0], asked, "model")
        cfg = override(saved[1], asked, "train")
    cfg = dataclasses.replace(cfg, data=args.data or cfg.data,
                              max_steps=args.max_steps or cfg.max_steps,
                              val_data=args.val_data or cfg.val_data)
    if saved:
        for note in resume_changes(saved, (model_cfg, cfg)):
            print(note)
    train_limits(cfg, "train config")
    if args.fsdp and (args.stage != 2 or "RANK" not in os.environ):
        raise UsageError("--fsdp shards the stage-2 generator across the processes of torchrun; "
                         "stage 1 and single-process runs use DDP or nothing")
    if args.watch_prompts and (args.stage == 1 or not os.path.isfile(args.watch_prompts)):
        raise UsageError(f"--watch-prompts {args.watch_prompts}: " + ("stage 2 only" if args.stage == 1 else "no such file"))
    if args.stage == 2:
        if not tokenizer_checkpoint:
            raise UsageError("stage 2 needs --tokenizer-checkpoint PATH (a stage-1 model.safetensors)")
        model_cfg = generator_config_for(tokenizer_checkpoint, model_cfg, cfg,
                                         same_data=not (saved or args.data))
        if args.init and not continued.path:
            model_cfg = fine_tuned_config(args.init, tokenizer_checkpoint, model_cfg, asked)
    elif args.init:
        raise UsageError("--init starts a stage-2 generator from a file; stage 1 has no such start")
    check_model_config(model_cfg, kind)
    check_pairing(kind, model_cfg, cfg, "the model and train configs")
    if args.perceptual_weights and (args.stage == 2 or not os.path.isfile(args.perceptual_weights)):
        raise UsageError(f"--perceptual-weights {args.perceptual_weights}: "
                         + ("stage 1 only" if args.stage == 2 else "no such file"))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot write to --out {out}: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"cannot write to --out {out}: not a writable folder")
    # held out: --val-data, or a share by name hash
    source, val_source, summary = train_and_val(cfg, args.stage)
    master = int(os.environ.get("RANK", "0")) == 0
    if master:
        # one run writes a folder at a time, from before --force clears it
        lock_run(out)
    if continued.replace and master:
        # --force: the old checkpoints and log go, now that the new run is accepted
        clear_run(out)
    if summary and master:
        print("\n".join(summary), flush=True)
    # a resumed fine-tune continues from its own train state
    init = None if continued.path else args.init
    return RunPlan(out, kind, model_cfg, cfg, source, val_source, continued.path,
                   tokenizer_checkpoint, init)


def fine_tuned_config(init: str, tokenizer_checkpoint: str, model_cfg: MaskGITConfig,
                      asked: list[str]):
    """--init: the config of the generator file a fine-tune starts from. The network is the
    file's, so a model field may be set only to the value it has."""
    model_cfg = init_config(init, tokenizer_checkpoint, model_cfg)
    changed = override(model_cfg, asked, "model")
    if changed != model_cfg:
        field = next(f.name for f in dataclasses.fields(model_cfg)
                     if getattr(changed, f.name) != getattr(model_cfg, f.name))
        raise UsageError(f"--init takes the model from {init}, whose {field} is "
                         f"{getattr(model_cfg, field)}; drop --set model.{field}")
    return model_cfg
