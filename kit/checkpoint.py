"""
Checkpoints: safetensors files that carry everything needed to use or continue a model, and nothing
that runs code when loaded (no pickles).

A run writes two files into its folder:
  model.safetensors        the weights to sample with (the EMA's when there is one); the metadata holds
                           format "phenaki", the stage, the kind (vqgan, cvivit, maskgit), the model
                           config as JSON, the step and the train config, so that sample.py and
                           evaluate.py need nothing but the file. A generator also carries its caption
                           tokenizer (BPE as JSON) and the sha256 of the stage-1 file it was trained on.
  train_state.safetensors  every module and optimizer of the run: what --resume restores (runs.py).
Keys are the raw module's (no `module.` or `_orig_mod.` prefixes), and loading is strict.

Writes are atomic: a temporary file, fsynced, renamed over the old one, whose previous version is
kept as `<file>.prev` (by hard link, so the checkpoint is never missing). A crash or a full disk
mid-write leaves the last good file whole, and a resume falls back to `.prev` if the newest is
unreadable.

Loading a generator reads both files' headers, checks them and their pairing, builds each model on
the meta device to compare shapes, and only then reads the tensors (checks.py says why).

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

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from kit.checks import (MODELS, Checked, Header, check_common, check_model, check_pair, checked_config,
                    model_bounds)
from kit.config import TOKENIZER_CONFIGS, TrainConfig, UsageError, exit_usage
from cvivit import CViViT
from maskgit import MaskGITConfig
from kit.outputs import check_destination
from text_encoder import CaptionTokenizer
from vqgan import VQGAN

# stage 1: vqgan, cvivit
TOKENIZERS = {kind: MODELS[kind] for kind in TOKENIZER_CONFIGS}

# the pairs that ship with the repo, a folder per world: sample.py and evaluate.py use them when no
# checkpoint is given, the default world's unless --world names another
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")
# what `python sample.py "a dog running"` draws
DEFAULT_WORLD = "animals"
# the worlds whose pairs ship (worlds.WORLDS, named here so that sample.py loads no world)
SHIPPED_WORLDS = ("animals", "shapes")


def shipped(world: str, kind: str) -> str:
    """The shipped model of a world: checkpoints/<world>/<kind>.safetensors,
    kind tokenizer or generator."""
    return os.path.join(SHIPPED, world, f"{kind}.safetensors")


def save_checkpoint(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write atomically and keep the previous file as `path.prev`: a crash or a full disk mid-write
    leaves the last good checkpoint whole. A failed write raises OSError and leaves no temporary."""
    tmp = f"{path}.tmp"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except (OSError, SafetensorError) as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"could not write {path}: {err}") from None
    if os.path.exists(path):
        # keep it as .prev, through a hard link, so that `path` never goes missing
        try:
            if os.path.exists(f"{path}.prev.tmp"):
                os.remove(f"{path}.prev.tmp")
            os.link(path, f"{path}.prev.tmp")
            os.replace(f"{path}.prev.tmp", f"{path}.prev")
        except OSError:
            # a filesystem without hard links: for a moment only .prev exists
            os.replace(path, f"{path}.prev")
    os.replace(tmp, path)
    if os.name == "posix":
        # make the renames durable (Windows cannot open a folder to fsync it)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def header(path: str) -> Header:
    """A safetensors file's header as it is, nothing allocated and nothing checked; a file that is
    missing or not safetensors is a UsageError that names it."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{path} is not a safetensors checkpoint ({err})") from None
    return Header(path, meta, shapes)


def read_header(path: str) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
    """A phenaki file's header -> (metadata, {key: (shape, dtype)}), the fields every file has
    (format, stage, step, the train config) checked (checks.check_common)."""
    found = header(path)
    check_common(found)
    return found.meta, found.shapes


def tensors_of(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read only once its header has been checked."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{path} is not a safetensors checkpoint ({err})") from None


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A phenaki safetensors file -> (tensors, metadata), its header checked first (read_header)."""
    meta, _ = read_header(path)
    return tensors_of(path), meta


def file_digest(path: str) -> str:
    """sha256 of a file: ties a generator to the exact tokenizer it was trained on."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_half(src: str, dst: str, tokenizer: str | None = None) -> None:
    """Copy a model.safetensors with its floating-point tensors in fp16: how checkpoints/<world>/
    is made. A tokenizer's copy records the sha256 of the file it came from
    (exported_from_sha256). For a generator, `tokenizer` names the exported tokenizer it will be
    paired with: the file it was trained on, or that file's copy; its sha256 replaces the recorded
    one, which is kept as `trained_on_sha256`."""
    check_destination(dst, [src] + ([tokenizer] if tokenizer else []))
    meta, _ = read_header(src)
    if meta["stage"] == "1":
        # a checked tokenizer, or a one-line error
        load_tokenizer(src)
        meta = meta | {"exported_from_sha256": file_digest(src)}
    elif tokenizer is None:
        raise UsageError(f"{src} is a generator: pass --tokenizer with the exported tokenizer "
                         "it pairs with")
    else:
        check_model(header(src), "2")
        # a readable stage-1 file, or a one-line error
        _, tok_meta = load_tokenizer(tokenizer)
        digest = file_digest(tokenizer)
        trained_on = meta.get("tokenizer_sha256")
        if trained_on is None:
            raise UsageError(f"{src} records no tokenizer_sha256: its pairing with {tokenizer} "
                             "cannot be checked")
        if trained_on not in (digest, tok_meta.get("exported_from_sha256")):
            raise UsageError(f"{tokenizer} is not the tokenizer {src} was trained on, nor its exported copy (sha256 "
                             "differs): export that tokenizer first and pass the copy")
        meta |= {"trained_on_sha256": trained_on, "tokenizer_sha256": digest}
    if tokenizer is not None and meta["stage"] != "2":
        raise UsageError(f"--tokenizer pairs a generator with a tokenizer; {src} is not a stage-2 "
                         "generator")
    tensors, _ = load_checkpoint(src)
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_checkpoint(dst, half, meta)


# ----------------------------------------------------------------------------- the two kinds of
# model

def tokenizer_meta(kind: str, config, step: int) -> dict[str, str]:
    return {"format": "phenaki", "stage": "1", "kind": kind,
            "config": json.dumps(dataclasses.asdict(config)), "step": str(step)}


def generator_meta(config: MaskGITConfig, step: int, text: CaptionTokenizer,
                   tokenizer_sha256: str) -> dict[str, str]:
    return {"format": "phenaki", "stage": "2", "kind": "maskgit",
            "config": json.dumps(dataclasses.asdict(config)), "step": str(step),
            "text_tokenizer": text.to_json(), "tokenizer_sha256": tokenizer_sha256}


def tokenizer_config(kind: str, config_json: str, where: str = "the tokenizer"):
    """A tokenizer's config of `kind` from its JSON, checked (JSON lists
    become the config's tuples)."""
    if kind not in TOKENIZER_CONFIGS:
        raise UsageError(f"{where}: unknown tokenizer kind {str(kind)[:40]!r}")
    return checked_config(TOKENIZER_CONFIGS[kind], config_json, f"{where}: config",
                          model_bounds(kind))


def build(checked: Checked, path: str) -> nn.Module:
    """The model a checked file describes, its weights read and loaded, in eval mode on the CPU."""
    model = MODELS[checked.kind](checked.config)
    model.load_state_dict({k: v.float() for k, v in tensors_of(path).items()})
    return model.eval()


def load_tokenizer(path: str) -> tuple[VQGAN | CViViT, dict[str, str]]:
    """A stage-1 checkpoint -> (model in eval mode on the CPU, metadata): its header read, checked
    (checks.check_model), then the model built and its tensors loaded."""
    found = header(path)
    return build(check_model(found, "1"), path), found.meta


def load_generator(path: str, tokenizer_path: str):
    """A stage-2 checkpoint and the tokenizer it was trained on -> (generator, caption tokenizer,
    stage-1 tokenizer, metadata), models in eval mode on the CPU. In order: both headers read, both
    files and their pairing (the tokenizer file's sha256) checked together in one call
    (checks.check_pair, which builds each model on the meta device), and only then the models
    built and their tensors read."""
    generator = header(path)
    tokenizer = header(tokenizer_path)
    gen, tok, text = check_pair(generator, tokenizer, file_digest(tokenizer_path))
    return build(gen, path), text, build(tok, tokenizer_path), generator.meta


def init_config(path: str, tokenizer_path: str, model_cfg: MaskGITConfig) -> MaskGITConfig:
    """The config of the generator file a fine-tune starts from (train.py --init), checked with the
    tokenizer it will train behind (checks.check_pair): the file must have been trained on that
    tokenizer, and its window must be the one this run's clips make (`model_cfg`'s)."""
    if not os.path.isfile(path):
        raise UsageError(f"--init {path}: no such file")
    gen = check_pair(header(path), header(tokenizer_path), file_digest(tokenizer_path))[0]
    config = gen.config
    if (config.latent_frames, config.grid) != (model_cfg.latent_frames, model_cfg.grid):
        raise UsageError(f"--init {path} reads windows of {config.latent_frames} latent frames of "
                         f"{config.grid} x {config.grid} codes; this run's clips make "
                         f"{model_cfg.latent_frames} of {model_cfg.grid} x {model_cfg.grid}")
    return config


def generator_config_for(tokenizer_path: str, model_cfg: MaskGITConfig, cfg: TrainConfig,
                         same_data: bool = False) -> MaskGITConfig:
    """The generator's config fitted to the stage-1 checkpoint it will train behind: its
    vocabulary must equal the codebook, and its window is the clip length and image size of
    stage 2. same_data: refuse data other than the tokenizer's (stage 2 without --data would
    quietly train on the preset's)."""
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
        raise UsageError(f"the tokenizer was trained at {trained['image_size']} pixels, stage 2 asks "
                         f"for {cfg.image_size}")
    if not 0 <= cfg.image_ratio <= 1:
        raise UsageError(f"--image-ratio must lie in [0, 1], got {cfg.image_ratio}")
    # the window: 1 + 2n frames are 1 + n latent frames of (size / 8)^2 codes
    return dataclasses.replace(model_cfg, latent_frames=1 + (cfg.frames - 1) // 2,
                               grid=cfg.image_size // 8)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kit.checkpoint", description="Checkpoint tools. export: an fp16 copy of a model.safetensors.")
    commands = p.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="copy a model.safetensors, float tensors in fp16")
    export.add_argument("src", help="a model.safetensors written by train.py")
    export.add_argument("dst", help="where the fp16 copy goes")
    export.add_argument("--tokenizer",
                        help="for a generator: the exported tokenizer it will be paired with")
    args = p.parse_args(argv)
    try:
        export_half(args.src, args.dst, args.tokenizer)
    except (UsageError, OSError) as err:
        exit_usage(err)
    print(f"wrote: {args.dst}")


if __name__ == "__main__":
    main()
