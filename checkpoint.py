"""
Checkpoints: safetensors files that carry everything needed to use or continue a model, and nothing
that runs code when loaded (no pickles).

A run writes two files into its folder:
  model.safetensors        the weights to sample with (the EMA's when there is one); the metadata holds
                           format "phenaki", the stage, the kind (vqgan, cvivit, maskgit), the model
                           config as JSON, the step and the train config, so that sample.py and
                           evaluate.py need nothing but the file. A generator also carries its caption
                           tokenizer (BPE as JSON) and the sha256 of the stage-1 file it was trained on.
  train_state.safetensors  every module (model, discriminator, EMA) as `<name>.<key>` and every
                           optimizer's moments as `<name>.<param index>.<key>`, the param groups as JSON
                           in the metadata: what --resume restores.
Keys are the raw module's (no `module.` or `_orig_mod.` prefixes), and loading is strict.

Writes are atomic: a temporary file, fsynced, renamed over the old one, whose previous version is kept
as `<file>.prev` (by hard link, so the checkpoint is never missing). A crash or a full disk mid-write
leaves the last good file whole, and a resume falls back to `.prev` if the newest is unreadable.

Under FSDP2 a state dict holds shards (DTensors): `whole` gathers them, so that the files are the same
as under DDP or in one process, and `restore_optimizer` shards the moments again on load.

As a command, it makes the fp16 copies that ship in checkpoints/<world>/:

    python checkpoint.py export runs/stage1-vqgan-tiny/model.safetensors checkpoints/shapes/tokenizer.safetensors
    python checkpoint.py export runs/stage2-maskgit-tiny/model.safetensors checkpoints/shapes/generator.safetensors \\
        --tokenizer checkpoints/shapes/tokenizer.safetensors
"""

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from checks import (MODELS, caption_tokenizer, check_tensors, checked_config, checked_model, model_bounds,
                    train_record)
from config import TOKENIZER_CONFIGS, TrainConfig, UsageError, exit_usage
from cvivit import CViViT
from maskgit import MaskGITConfig
from text_encoder import CaptionTokenizer
from vqgan import VQGAN

TOKENIZERS = {kind: MODELS[kind] for kind in TOKENIZER_CONFIGS}  # stage 1: vqgan, cvivit

# the pairs that ship with the repo, a folder per world: sample.py and evaluate.py use them when no
# checkpoint is given, the default world's unless --world names another
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
DEFAULT_WORLD = "animals"  # what `python sample.py "a dog running"` draws


def shipped(world: str, kind: str) -> str:
    """The shipped model of a world: checkpoints/<world>/<kind>.safetensors, kind tokenizer or generator."""
    return os.path.join(SHIPPED, world, f"{kind}.safetensors")


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


def read_header(path: str) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
    """A phenaki safetensors file's header -> (metadata, {key: (shape, dtype)}), nothing allocated; the
    fields every file has (format, stage, step, the train config) checked. A UsageError names the file."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{path} is not a safetensors checkpoint ({err})") from None
    if meta.get("format") != "phenaki":
        raise UsageError(f"{path} is not a phenaki checkpoint")
    if meta.get("stage") not in ("1", "2"):
        raise UsageError(f"{path}: stage must be 1 or 2, not {meta.get('stage')!r}")
    for key in ("step", "clips_seen"):  # the step every file has; the clips a stage-1 train state consumed
        if (key == "step" or key in meta) and not (meta.get(key, "").isdigit() and int(meta[key]) < 10 ** 15):
            raise UsageError(f"{path}: {key} must be a whole number, not {str(meta.get(key))[:40]!r}")
    if "train_config" in meta:
        train_record(meta["train_config"], f"{path}: train_config")
    return meta, shapes


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A phenaki safetensors file -> (tensors, metadata), its header checked first (read_header)."""
    meta, _ = read_header(path)
    try:
        return load_file(path), meta
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{path} is not a safetensors checkpoint ({err})") from None


def file_digest(path: str) -> str:
    """sha256 of a file: ties a generator to the exact tokenizer it was trained on."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_half(src: str, dst: str, tokenizer: str | None = None) -> None:
    """Copy a model.safetensors with its floating-point tensors in fp16: how checkpoints/<world>/ is made.
    A tokenizer's copy records the sha256 of the file it came from (exported_from_sha256). For a generator,
    `tokenizer` names the exported tokenizer it will be paired with: the file it was trained on, or that
    file's copy; its sha256 replaces the recorded one, which is kept as `trained_on_sha256`."""
    meta, _ = read_header(src)
    if meta["stage"] == "1":
        load_tokenizer(src)  # a checked tokenizer, or a one-line error
        meta = meta | {"exported_from_sha256": file_digest(src)}
    elif tokenizer is None:
        raise UsageError(f"{src} is a generator: pass --tokenizer with the exported tokenizer it pairs with")
    else:
        model_header(src, "2")
        _, tok_meta = load_tokenizer(tokenizer)  # a readable stage-1 file, or a one-line error
        digest, trained_on = file_digest(tokenizer), meta.get("tokenizer_sha256")
        if trained_on not in (digest, tok_meta.get("exported_from_sha256")):
            raise UsageError(f"{tokenizer} is not the tokenizer {src} was trained on, nor its exported copy (sha256 "
                             "differs): export that tokenizer first and pass the copy")
        meta |= {"trained_on_sha256": trained_on, "tokenizer_sha256": digest}
    if tokenizer is not None and meta["stage"] != "2":
        raise UsageError(f"--tokenizer pairs a generator with a tokenizer; {src} is not a stage-2 generator")
    tensors, _ = load_checkpoint(src)
    save_checkpoint(dst, {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, meta)


# ----------------------------------------------------------------------------- the two kinds of model

def tokenizer_meta(kind: str, config, step: int) -> dict[str, str]:
    return {"format": "phenaki", "stage": "1", "kind": kind, "config": json.dumps(dataclasses.asdict(config)),
            "step": str(step)}


def generator_meta(config: MaskGITConfig, step: int, text: CaptionTokenizer, tokenizer_sha256: str) -> dict[str, str]:
    return {"format": "phenaki", "stage": "2", "kind": "maskgit", "config": json.dumps(dataclasses.asdict(config)),
            "step": str(step), "text_tokenizer": text.to_json(), "tokenizer_sha256": tokenizer_sha256}


def tokenizer_config(kind: str, config_json: str, where: str = "the tokenizer"):
    """A tokenizer's config of `kind` from its JSON, checked (JSON lists become the config's tuples)."""
    if kind not in TOKENIZER_CONFIGS:
        raise UsageError(f"{where}: unknown tokenizer kind {str(kind)[:40]!r}")
    return checked_config(TOKENIZER_CONFIGS[kind], config_json, f"{where}: config", model_bounds(kind))


def model_header(path: str, stage: str) -> tuple[dict[str, str], dict]:
    """read_header for a model.safetensors of `stage`: a train state or the other stage's model given in its
    place is one line, not a load_state_dict error listing hundreds of keys."""
    meta, shapes = read_header(path)
    if any(k.startswith("opt.") for k in shapes):
        raise UsageError(f"{path} is a train state (for --resume); give the model.safetensors beside it")
    if meta["stage"] != stage:
        raise UsageError(f"{path} holds a stage-{meta['stage']} model, not a stage-{stage} "
                         + ("tokenizer" if stage == "1" else "generator"))
    if meta.get("kind") not in (TOKENIZERS if stage == "1" else ("maskgit",)):
        raise UsageError(f"{path}: unknown model kind {str(meta.get('kind'))[:40]!r}")
    if "config" not in meta:
        raise UsageError(f"{path}: the model config is missing")
    return meta, shapes


def load_tokenizer(path: str) -> tuple[VQGAN | CViViT, dict[str, str]]:
    """A stage-1 checkpoint -> (model in eval mode on the CPU, metadata)."""
    meta, shapes = model_header(path, "1")
    model = checked_model(path, meta["kind"], meta["config"], shapes)
    model.load_state_dict({k: v.float() for k, v in load_checkpoint(path)[0].items()})
    return model.eval(), meta


def load_generator(path: str, tokenizer_path: str):
    """A stage-2 checkpoint and the tokenizer it was trained on -> (generator, caption tokenizer,
    stage-1 tokenizer, metadata), models in eval mode on the CPU."""
    meta, shapes = model_header(path, "2")
    tokenizer, _ = load_tokenizer(tokenizer_path)
    if file_digest(tokenizer_path) != meta.get("tokenizer_sha256"):
        raise UsageError(f"{path} was trained on another tokenizer than {tokenizer_path} (sha256 differs): pass "
                         "--tokenizer-checkpoint with the stage-1 model.safetensors it was trained on")
    model = checked_model(path, "maskgit", meta["config"], shapes)
    if model.config.codebook_size != tokenizer.quantizer.codebook.shape[0]:
        raise UsageError(f"{path} reads {model.config.codebook_size} codes, {tokenizer_path} writes "
                         f"{tokenizer.quantizer.codebook.shape[0]}")
    text = caption_tokenizer(path, meta, model.config.text.vocab_size)
    model.load_state_dict({k: v.float() for k, v in load_checkpoint(path)[0].items()})
    return model.eval(), text, tokenizer, meta


def generator_config_for(tokenizer_path: str, model_cfg: MaskGITConfig, cfg: TrainConfig,
                         same_data: bool = False) -> MaskGITConfig:
    """The generator's config fitted to the stage-1 checkpoint it will train behind: its vocabulary
    must equal the codebook, and its window is the clip length and image size of stage 2. same_data:
    refuse data other than the tokenizer's (stage 2 without --data would quietly train on the preset's)."""
    tokenizer, meta = load_tokenizer(tokenizer_path)
    K = tokenizer.quantizer.codebook.shape[0]
    if model_cfg.codebook_size != K:
        raise UsageError(f"the generator's vocabulary ({model_cfg.codebook_size}) must equal the tokenizer's "
                         f"codebook size ({K}); pass --set model.codebook_size={K}")
    trained = json.loads(meta.get("train_config", "{}"))
    if same_data and trained.get("data", cfg.data) != cfg.data:
        raise UsageError(f"the tokenizer was trained on --data {trained['data']}, and stage 2 would train on "
                         f"{cfg.data}: pass --data {trained['data']} (or --data {cfg.data} if you mean it)")
    if trained.get("image_size", cfg.image_size) != cfg.image_size:
        raise UsageError(f"the tokenizer was trained at {trained['image_size']} pixels, stage 2 asks for {cfg.image_size}")
    if not 0 <= cfg.image_ratio <= 1:
        raise UsageError(f"--image-ratio must lie in [0, 1], got {cfg.image_ratio}")
    # the window: 1 + 2n frames are 1 + n latent frames of (size / 8)^2 codes
    return dataclasses.replace(model_cfg, latent_frames=1 + (cfg.frames - 1) // 2, grid=cfg.image_size // 8)


# ----------------------------------------------------------------------------- a run's state

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


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict, groups_json: str, prefix: str,
                      path: str = "the train state") -> None:
    """The inverse of optimizer_tensors, each moment and group checked against the optimizer first.
    Under FSDP each rank keeps its shard of a parameter's moments."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            i, _, name = key[len(prefix) + 1:].partition(".")
            if not i.isdigit() or int(i) >= len(params) or name not in ("step", "exp_avg", "exp_avg_sq"):
                raise UsageError(f"{path}: {key[:60]} is no state of the {prefix} optimizer")
            p = params[int(i)]
            if name != "step" and list(value.shape) != list(p.shape):
                raise UsageError(f"{path}: {key} is {tuple(value.shape)}, its parameter {tuple(p.shape)}")
            if isinstance(p, DTensor) and name != "step":  # exp_avg, exp_avg_sq: shaped like the parameter
                value = distribute_tensor(value.to(p.device_mesh.device_type), p.device_mesh, p.placements)
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


def save_weights(out: str, meta: dict[str, str], cfg: TrainConfig, weights: dict[str, torch.Tensor]) -> None:
    """<out>/model.safetensors: the weights with the model and train configs in the metadata."""
    save_checkpoint(os.path.join(out, "model.safetensors"), weights,
                    meta | {"train_config": json.dumps(dataclasses.asdict(cfg))})


def save_run(out: str, meta: dict[str, str], cfg: TrainConfig, modules: dict[str, nn.Module],
             opts: dict[str, torch.optim.Optimizer], write: bool = True) -> None:
    """model.safetensors: the weights to sample with (the EMA's when there is one);
    train_state.safetensors: every module and optimizer, for --resume. Under FSDP every rank calls
    this (the shards are gathered first) and only the one with `write` writes. A failed write (a full
    disk) keeps the previous checkpoint and says so: the next save tries again."""
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
        save_checkpoint(os.path.join(out, "train_state.safetensors"), tensors,
                        meta | groups | {"train_config": json.dumps(dataclasses.asdict(cfg))})
    except OSError as err:
        print(f"warning: checkpoint at step {meta['step']} not saved ({err}); the previous one is kept", file=sys.stderr)


STATE = "train_state.safetensors"  # what --resume reads; model.safetensors alone cannot be resumed


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
                continue  # a torn file still means that a run is there
    return {} if any(os.path.exists(os.path.join(out, name)) for name in files) else None


def resume_point(out: str) -> tuple[str | None, dict[str, str], list[str]]:
    """What --resume continues from: the newest readable of <out>/train_state.safetensors and the .prev kept
    beside it -> (its path or None, its metadata, what was wrong with the newer ones). The configs and the
    weights both come from this one file."""
    problems = []
    for path in (os.path.join(out, STATE), os.path.join(out, STATE + ".prev")):
        if os.path.exists(path):
            try:
                return path, read_header(path)[0], problems
            except UsageError as err:
                problems.append(str(err))
    return None, {}, problems


def saved_configs(meta: dict[str, str], where: str = "the saved run") -> tuple[object, TrainConfig]:
    """The model and train configs a run saved with its checkpoint, checked -> (model config, TrainConfig)."""
    model_cfg = (checked_config(MaskGITConfig, meta.get("config"), f"{where}: config", model_bounds("maskgit"))
                 if meta.get("stage") == "2" else tokenizer_config(meta.get("kind"), meta.get("config"), where))
    return model_cfg, checked_config(TrainConfig, meta.get("train_config"), f"{where}: train_config")


def resumed_run(args) -> tuple | None:
    """Whether this command may use --out, and what it continues there: -> the saved (model config,
    TrainConfig) when it resumes a run that saved them, None for a fresh start (or an older run, whose
    configs come from the flags as before). A fresh start in a folder that holds a run needs --force."""
    meta = saved_run(args.out)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # torchrun resumes by itself
    if meta is not None and not (args.resume or restarted):
        if not args.force:
            raise UsageError(f"{args.out} already holds a run (step {meta.get('step', '?')}): add --resume to "
                             "continue it, or --force to start a new one there")
        args.replace = True  # setup removes the old run's files once everything else is accepted
        return None
    if meta is None:
        if args.resume and not restarted:
            raise UsageError(f"nothing to resume in {args.out}: it holds no checkpoint; leave out --resume to start a run")
        return None
    args.resume_from, meta, problems = resume_point(args.out)
    if args.resume_from is None:  # model.safetensors alone: resuming would start afresh and overwrite it
        raise UsageError(f"--resume needs {os.path.join(args.out, STATE)} (the optimizer and the step): "
                         + (f"no readable train state to resume from ({problems[0]})" if problems else "it is missing")
                         + "; start a new run in another --out")
    if problems:
        print(f"warning: {problems[0]}; resuming from {args.resume_from}", file=sys.stderr)
    if "train_config" not in meta:
        return None
    if meta.get("stage") != str(args.stage):
        raise UsageError(f"{args.out} holds a stage-{meta.get('stage')} run; this command is --stage {args.stage}")
    if args.stage == 1:
        args.tokenizer = meta["kind"]
    else:
        args.tokenizer_checkpoint = args.tokenizer_checkpoint or meta.get("tokenizer_checkpoint")
        if os.path.isfile(args.tokenizer_checkpoint or "") and file_digest(args.tokenizer_checkpoint) != meta.get(
                "tokenizer_sha256"):  # other codes: the cache and the generator would no longer mean the same
            raise UsageError(f"{args.tokenizer_checkpoint} is not the tokenizer this run trained behind (sha256 "
                             f"differs from the one saved in {args.resume_from}); resume with that tokenizer")
    return saved_configs(meta, args.resume_from)


def clear_run(out: str) -> None:
    """Remove a run's checkpoints (and the copies kept beside them), its log and its token cache: what --force
    replaces."""
    for name in ("model.safetensors", "train_state.safetensors", "log.jsonl"):
        for path in (os.path.join(out, name), os.path.join(out, name) + ".prev"):
            if os.path.exists(path):
                os.remove(path)
    shutil.rmtree(os.path.join(out, "token_cache"), ignore_errors=True)  # stage 2's codes of the old run's data


def load_train_state(path: str | None) -> tuple[str, dict, dict[str, str]] | None:
    """The train state resumed_run chose (resume_point) -> (its path, tensors, metadata); None: start afresh."""
    return None if path is None else (path, *load_checkpoint(path))


def restore_modules(tensors: dict, modules: dict[str, nn.Module], path: str = "the train state") -> None:
    """The weights of save_run's train state, into modules not yet sharded, each checked first."""
    shapes = {k: (list(v.shape), "F32" if v.is_floating_point() else "I64") for k, v in tensors.items()}
    for name, m in modules.items():
        check_tensors(path, m, shapes, name + ".")
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})


def restore_optimizers(tensors: dict, meta: dict[str, str], opts: dict[str, torch.optim.Optimizer],
                       path: str = "the train state") -> int:
    """The optimizer states of save_run's train state (after sharding, if any) -> the step to continue from."""
    for name, opt in opts.items():
        if f"{name}_groups" not in meta:
            raise UsageError(f"{path}: the {name} optimizer's groups are missing")
        restore_optimizer(opt, tensors, meta[f"{name}_groups"], name, path)
    return int(meta["step"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Checkpoint tools. export: an fp16 copy of a model.safetensors.")
    commands = p.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="copy a model.safetensors with its float tensors in fp16")
    export.add_argument("src", help="a model.safetensors written by train.py")
    export.add_argument("dst", help="where the fp16 copy goes")
    export.add_argument("--tokenizer", help="for a generator: the exported tokenizer it will be paired with")
    args = p.parse_args(argv)
    try:
        export_half(args.src, args.dst, args.tokenizer)
    except (UsageError, OSError) as err:
        exit_usage(err)
    print(f"wrote: {args.dst}")


if __name__ == "__main__":
    main()
