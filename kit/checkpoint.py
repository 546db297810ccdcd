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

As a command, it makes the fp16 copies that ship in checkpoints/<world>/:

    python -m kit.checkpoint export runs/stage1-vqgan-tiny/model.safetensors checkpoints/shapes/tokenizer.safetensors
    python -m kit.checkpoint export runs/stage2-maskgit-tiny/model.safetensors \\
        checkpoints/shapes/generator.safetensors --tokenizer checkpoints/shapes/tokenizer.safetensors

Loading checks a file before anything is built from it (the first half of this file): a file is
data, and people share checkpoints. A phenaki file's metadata says what model to build (its config as JSON) and carries a caption
tokenizer (BPE as JSON). Built as asked, a crafted file could ask for terabytes (a width of 10^6) or
a million layers before any tensor is compared. So loading goes in this order:
  1. every config field is checked (checked_config): a known name, of its field's type, positive,
     and at most PRESET_SCALE times the largest value any preset of config.py uses for it;
  2. the model is built on the `meta` device, which allocates nothing, and its state-dict keys,
     shapes and kinds (float or integer) are compared with the file's header (check_tensors);
  3. only then are the tensors read and the real model built (`build`).
A disagreement is a UsageError: one line that names the file and the first field or tensor that is
wrong, which the scripts turn into exit code 2. Each load makes one call to the checks: check_model
for a tokenizer, check_pair for a generator and its tokenizer (their grid, window and vocabulary
must agree). runs.py checks train states with the same pieces (their optimizer moments against the
parameters there). The caption tokenizer is read here too (caption_tokenizer), since the tokenizers
library raises bare Exceptions.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cvivit import CViViT
from kit.config import (CHOICES, SEED_MAX, STEPS_MAX, TOKENIZER_CONFIGS, TrainConfig,
                        generator_preset, tokenizer_preset)
from kit.faults import UsageError, exit_usage
from kit.outputs import check_destination
from maskgit import MaskGIT, MaskGITConfig
from text_encoder import MIN_VOCAB, CaptionTokenizer
from vqgan import VQGAN


# ----------------------------------------------------------------------------- checks

# a file's `kind` -> its class
MODELS = {"vqgan": VQGAN, "cvivit": CViViT, "maskgit": MaskGIT}
# config.py's named sizes
PRESETS = ("tiny", "base", "paper")
# a file may ask for up to 4 times what the largest preset uses, field by field
PRESET_SCALE = 4


def preset_bounds(configs: list) -> dict[str, float]:
    """The bound of each numeric field of a config class: PRESET_SCALE times its largest value over
    the presets `configs` (a tuple's largest element); a nested config's fields as `text.<field>`."""
    bounds: dict[str, float] = {}
    for config in configs:
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if dataclasses.is_dataclass(value):
                nested = preset_bounds([value])
                for k, v in nested.items():
                    key = f"{f.name}.{k}"
                    bounds[key] = max(v, bounds.get(key, 0))
            elif isinstance(value, (int, float, tuple)) and not isinstance(value, bool) and value != ():
                bounds[f.name] = max(bounds.get(f.name, 0), PRESET_SCALE * (max(value) if isinstance(value, tuple) else value))
    return bounds


def model_bounds(kind: str) -> dict[str, float]:
    """Field bounds of a model kind (vqgan, cvivit, maskgit) from config.py's presets."""
    presets = [tokenizer_preset(p, kind)[0] if kind in TOKENIZER_CONFIGS else generator_preset(p)[0] for p in PRESETS]
    # the class defaults count as a preset
    bounds = preset_bounds(presets + [type(presets[0])()])
    # a head may be as wide as the model
    return bounds | ({"head_dim": bounds["dim"]} if "dim" in bounds else {})


def checked_value(value, default, name: str, bounds: dict[str, float] | None, where: str):
    """One config field read from a file, checked against its dataclass default's type and
    its bound."""
    def refuse(why: str):
        raise UsageError(f"{where}: {name} {why}, not {str(value)[:40]!r}")
    if dataclasses.is_dataclass(default):
        sub = None
        if bounds is not None:
            sub = {k.split(".", 1)[1]: v for k, v in bounds.items() if k.startswith(name + ".")}
        return checked_config(type(default), value, f"{where}: {name}", sub)
    if isinstance(default, bool) or isinstance(default, str):
        if type(value) is not type(default):
            refuse(f"must be a {type(default).__name__}")
        if value not in CHOICES.get(name, (value,)):
            # a model config's strings are choices
            refuse(f"must be one of {', '.join(CHOICES[name])}")
        return value
    if default is None and value is None:
        return None
    items = value if isinstance(default, tuple) else [value]
    if isinstance(default, tuple) and not (isinstance(value, list) and 0 < len(value) <= 16):
        refuse("must be a list of up to 16 numbers")
    whole = isinstance(default, int) or isinstance(default, tuple) or default is None
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)) or not math.isfinite(v):
            refuse("must be a whole number" if whole else "must be a number")
        if v < 0 or (bounds is not None and whole and v == 0):
            # a model's sizes are positive
            refuse("must be positive")
        if bounds is not None and name in bounds and v > max(bounds[name], 1):
            refuse(f"must be at most {bounds[name]:g} ({PRESET_SCALE}x the largest preset's)")
    return tuple(value) if isinstance(default, tuple) else value


def json_fields(text, where: str) -> dict:
    """A config's fields from its JSON (or the dict already parsed): a JSON object, or a UsageError."""
    try:
        fields = json.loads(text) if isinstance(text, str) else text
    except (json.JSONDecodeError, RecursionError):
        # '[' * 10**5 nests deeper than the parser's stack
        raise UsageError(f"{where} is not JSON") from None
    if not isinstance(fields, dict):
        raise UsageError(f"{where} must be a JSON object of fields")
    return fields


def checked_config(cls, text, where: str, bounds: dict[str, float] | None = None):
    """A config dataclass from its JSON (or the parsed dict), every field checked
    (checked_value): known, of its type, positive, within `bounds` (None: the train config, whose
    sizes allocate nothing)."""
    fields = json_fields(text, where)
    defaults = cls()
    unknown = [k for k in fields if k not in {f.name for f in dataclasses.fields(cls)}]
    if unknown:
        raise UsageError(f"{where}: unknown field {unknown[0][:40]!r}")
    checked = {k: checked_value(v, getattr(defaults, k), k, bounds, where) for k, v in fields.items()}
    return cls(**checked)


# the least positive value of a field that must be above 0 (a clip norm of 0 stops every update)
POSITIVE = 1e-12
# What a train config may ask for, field by field: (least, most), both included; every number of
# TrainConfig has a row, fps its own check. Each bound keeps a number from being a divisor of zero,
# an empty batch, or a size that allocates without bound when a file asks for it, and a rate, share
# or weight from turning the method around: a negative clip norm flips the gradients, an EMA decay
# above 1 saves weights that grow away from the model's, a negative fold cosine folds every code.
TRAIN_LIMITS = {
    "frames": (1, 129),
    "image_size": (8, 512),
    "batch_size": (1, 4096),
    "grad_accum": (1, 1024),
    "max_steps": (1, 10 ** 9),
    "log_every": (1, 10 ** 9),
    "save_every": (1, 10 ** 9),
    "image_every": (1, 10 ** 9),
    "restart_every": (1, 10 ** 9),
    "cache_clips": (1, 10 ** 9),
    "sample_steps": (1, STEPS_MAX),
    "workers": (0, 256),
    "warmup": (0, 10 ** 9),
    "gan_start": (0, 10 ** 9),
    "prefix_frames": (0, 1024),
    "seed": (0, SEED_MAX),
    "lr": (0, 10),
    "min_lr": (0, 10),
    "weight_decay": (0, 10),
    # AdamW's second-moment decay, below 1
    "beta2": (0, 0.999999),
    "grad_clip": (POSITIVE, 10 ** 6),
    # 0 turns the EMA off; 1 would never move
    "ema": (0, 0.999999),
    "fold_cosine": (0, 1),
    "gan_weight": (0, 100),
    "perceptual_weight": (0, 100),
    "motion_weight": (0, 100),
    "image_ratio": (0, 1),
    "prefix_masks": (0, 1),
}
# pixels per latent code along each side (the f8 compression): image sizes are multiples of it
GRID = 8
# The most pixels one batch may hold, batch_size x frames x image_size^2: about 12 times the largest
# preset's (base: 32 clips of 11 frames at 128^2). Each field within its row, a tokenizer file can
# still ask fold.py to count 4096 clips of 129 frames at 512^2 at once, 416 GB in fp32.
BATCH_PIXELS = 1 << 26


def train_limits(cfg: TrainConfig, where: str) -> TrainConfig:
    """A train config within TRAIN_LIMITS, its clips 1 + 2n frames of a whole latent grid, sampled
    at a positive rate of at most 240 frames a second; else a UsageError that names the field."""
    for name, (low, high) in TRAIN_LIMITS.items():
        value = getattr(cfg, name)
        # NaN fails both comparisons
        if not low <= value <= high:
            span = f"lie in {low} to {high:g}"
            if low == POSITIVE:
                span = f"be above 0 and at most {high:g}"
            raise UsageError(f"{where}: {name} must {span}, not {value}")
    pixels = cfg.batch_size * cfg.frames * cfg.image_size ** 2
    if pixels > BATCH_PIXELS:
        raise UsageError(f"{where}: a batch of {cfg.batch_size} clips of {cfg.frames} frames at "
                         f"{cfg.image_size}^2 holds {pixels:.3g} pixels, above {BATCH_PIXELS:.3g}")
    if cfg.frames % 2 == 0:
        # a causal tokenizer encodes the first frame alone, then pairs
        raise UsageError(f"{where}: frames must be 1 + 2n, not {cfg.frames}")
    if cfg.image_size % GRID:
        raise UsageError(f"{where}: image_size must be a multiple of {GRID}, not {cfg.image_size}")
    if not 0 < cfg.fps <= 240:
        raise UsageError(f"{where}: fps must lie in (0, 240], not {cfg.fps}")
    return cfg


def checked_train(text, where: str) -> TrainConfig:
    """A run's saved train config from its JSON: checked_config's checks, then train_limits."""
    return train_limits(checked_config(TrainConfig, text, where), where)


def train_record(text, where: str) -> TrainConfig:
    """The train config a model file records, checked as checked_train does but for the fields this
    version no longer has, which are left out: the record is read for the run's data, sizes and fps,
    not resumed."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return checked_train({k: v for k, v in json_fields(text, where).items() if k in known}, where)


# a float tensor may be stored in any of these (fp16 exports)
FLOATS = ("F16", "BF16", "F32", "F64")
# keys a file may lack: books saved before near-copies were folded
OPTIONAL = ("quantizer.alias",)


def check_tensors(path: str, model: nn.Module, shapes: dict, prefix: str = "") -> None:
    """The file's tensors (under `prefix`) must be the model's state dict: the same keys, shapes
    and kinds."""
    expected = {prefix + k: v for k, v in model.state_dict().items()}
    mine = {k: v for k, v in shapes.items() if k.startswith(prefix)}
    for key in sorted(set(expected) | set(mine)):
        if key not in mine and not key.endswith(OPTIONAL):
            raise UsageError(f"{path}: the model has {key}, the file does not")
        if key not in expected:
            raise UsageError(f"{path}: the file has {key}, which the model does not")
        if key in mine:
            shape, dtype = mine[key]
            want = expected[key]
            if list(shape) != list(want.shape):
                raise UsageError(f"{path}: {key} is {tuple(shape)} in the file, {tuple(want.shape)} in the model")
            if want.is_floating_point() != (dtype in FLOATS):
                raise UsageError(f"{path}: {key} is {dtype} in the file, {want.dtype} in the model")


# what a model's constructor raises when its fields are each in range but not together (heads that
# do not divide the width, widths that make no whole GroupNorm groups)
BUILD_ERRORS = (AssertionError, ZeroDivisionError, ValueError)


def skeleton(cls, config, where: str) -> nn.Module:
    """The model of `config` on the meta device, which allocates nothing: its state dict's shapes,
    or a UsageError when the fields do not fit together."""
    try:
        with torch.device("meta"):
            return cls(config)
    except BUILD_ERRORS as err:
        raise UsageError(f"{where}: the config's fields do not fit together ({err})") from None


def check_model_config(config, kind: str, where: str = "model config") -> None:
    """A model config asked for on the command line, checked as a file's is: each field within its
    bound (checked_config), then the fields together (skeleton)."""
    checked_config(type(config), json.dumps(dataclasses.asdict(config)), where, model_bounds(kind))
    skeleton(MODELS[kind], config, where)


def check_pairing(kind: str, config, record: TrainConfig, where: str) -> None:
    """A model config against the train config of its clips, for the fields that are each in range
    but must agree: a C-ViViT's position grid is its clips' size, in patches of the f8 grid, and its
    temporal table covers their latent frames. A generator's window holds two latent frames at least
    (one cannot shift: a longer video would be planned as empty windows without end), and its text
    encoder the caption BPE's byte alphabet and specials (text_encoder.MIN_VOCAB)."""
    if kind == "cvivit":
        latent = 1 + (record.frames - 1) // 2
        if config.image_size != record.image_size or config.patch != GRID:
            raise UsageError(f"{where}: a C-ViViT of {config.image_size}-pixel positions in "
                             f"{config.patch}-pixel patches cannot read {record.image_size}-pixel "
                             f"clips in the f{GRID} grid: set model.image_size={record.image_size}")
        if latent > config.max_latent_frames:
            raise UsageError(f"{where}: clips of {record.frames} frames are {latent} latent frames, "
                             f"past the C-ViViT's max_latent_frames {config.max_latent_frames}")
    if kind == "maskgit" and config.latent_frames < 2:
        raise UsageError(f"{where}: a window of one latent frame cannot shift to make a video; "
                         "train stage 2 on clips of 3 frames or more")
    if kind == "maskgit" and config.text.vocab_size < MIN_VOCAB:
        raise UsageError(f"{where}: text.vocab_size {config.text.vocab_size} is below the caption "
                         f"BPE's {MIN_VOCAB} tokens (256 bytes and 2 specials)")


def check_indices(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Integer tensors that index another must point inside it: a quantizer's alias names codes of
    its book."""
    for key, value in tensors.items():
        if key.endswith("quantizer.alias"):
            size = tensors[key.removesuffix("alias") + "codebook"].shape[0]
            if value.numel() and not 0 <= int(value.min()) <= int(value.max()) < size:
                raise UsageError(f"{path}: {key} names codes outside the book of {size}")


def caption_tokenizer(path: str, meta: dict[str, str], vocab_size: int) -> CaptionTokenizer:
    """The caption tokenizer a generator file carries, read and checked against its text vocabulary."""
    try:
        text = CaptionTokenizer.from_json(meta["text_tokenizer"])
    except Exception as err:
        # the tokenizers library raises plain Exception on a malformed BPE
        raise UsageError(f"{path}: the caption tokenizer is not readable ({str(err)[:60]})") from None
    if text.vocab_size > vocab_size:
        raise UsageError(f"{path}: the caption tokenizer has {text.vocab_size} tokens, the text encoder {vocab_size}")
    # a crafted table may count few tokens and number them past the text encoder's embeddings
    largest = max(text.bpe.get_vocab(with_added_tokens=True).values(), default=0)
    if largest >= vocab_size:
        raise UsageError(f"{path}: the caption tokenizer numbers a token {largest}, past the text "
                         f"encoder's {vocab_size}")
    return text


# ----------------------------------------------------------------------------- a whole file, in one call

class Header(NamedTuple):
    """A safetensors file's header as read, nothing allocated: its metadata and its tensors' {key:
    (shape, dtype)}."""
    path: str
    meta: dict[str, str]
    shapes: dict[str, tuple[list[int], str]]


class Checked(NamedTuple):
    """A model file's header, checked: what to build from it, and what its run recorded."""
    kind: str  # vqgan, cvivit or maskgit
    config: object  # the model config, every field within its bound
    record: TrainConfig  # the train config it recorded (defaults for what it does not record)


def check_common(header: Header) -> TrainConfig:
    """The fields every phenaki file has (format, stage, step; a stage-1 train state's clips_seen;
    the train config) -> the recorded train config."""
    path = header.path
    meta = header.meta
    if meta.get("format") != "phenaki":
        raise UsageError(f"{path} is not a phenaki checkpoint")
    if meta.get("stage") not in ("1", "2"):
        raise UsageError(f"{path}: stage must be 1 or 2, not {meta.get('stage')!r}")
    for key in ("step", "clips_seen"):
        # ASCII digits only: str.isdigit() passes "²", which int() refuses
        given = key == "step" or key in meta
        if given and not re.fullmatch(r"[0-9]{1,15}", meta.get(key, "")):
            raise UsageError(f"{path}: {key} must be a whole number, not {str(meta.get(key))[:40]!r}")
    return train_record(meta.get("train_config", "{}"), f"{path}: train_config")


def check_model(header: Header, stage: str) -> Checked:
    """A model.safetensors of `stage`, checked before anything is built from it: its common fields,
    its kind and config, the model's shapes on the meta device against the file's, and the integer
    tensors that index (read alone, a few kilobytes). A train state or the other stage's model given
    in its place is one line, not a load_state_dict error listing hundreds of keys."""
    path, meta, shapes = header
    record = check_common(header)
    if any(k.startswith("opt.") for k in shapes):
        raise UsageError(f"{path} is a train state (for --resume); give the model.safetensors beside it")
    if meta["stage"] != stage:
        wanted = "tokenizer" if stage == "1" else "generator"
        raise UsageError(f"{path} holds a stage-{meta['stage']} model, not a stage-{stage} {wanted}")
    kinds = TOKENIZER_CONFIGS if stage == "1" else ("maskgit",)
    kind = meta.get("kind")
    if kind not in kinds:
        raise UsageError(f"{path}: unknown model kind {str(kind)[:40]!r}")
    if "config" not in meta:
        raise UsageError(f"{path}: the model config is missing")
    config_cls = TOKENIZER_CONFIGS.get(kind, MaskGITConfig)
    config = checked_config(config_cls, meta["config"], f"{path}: config", model_bounds(kind))
    check_tensors(path, skeleton(MODELS[kind], config, path), shapes)
    check_pairing(kind, config, record, path)
    if "quantizer.alias" in shapes:
        with safe_open(path, framework="pt") as f:
            books = {k: f.get_tensor(k) for k in ("quantizer.alias", "quantizer.codebook")}
        check_indices(path, books)
    return Checked(kind, config, record)


def check_pair(generator: Header, tokenizer: Header,
               digest: str) -> tuple[Checked, Checked, CaptionTokenizer]:
    """A generator and its tokenizer (whose file's sha256 is `digest`), each checked (check_model)
    and then together: the generator was trained on that tokenizer, and reads its codes, on its
    grid, in the window it trained on (a file that asks for more would sample for minutes where the
    pair takes seconds) -> both, and the caption tokenizer the generator carries."""
    gen = check_model(generator, "2")
    tok = check_model(tokenizer, "1")
    if digest != generator.meta.get("tokenizer_sha256"):
        raise UsageError(f"{generator.path} was trained on another tokenizer than {tokenizer.path} "
                         "(sha256 differs): pass --tokenizer-checkpoint with the stage-1 "
                         "model.safetensors it was trained on")
    size = tok.record.image_size
    if gen.config.grid * GRID != size:
        raise UsageError(f"{generator.path} reads a grid of {gen.config.grid} x {gen.config.grid} "
                         f"codes, {tokenizer.path} writes {size // GRID} x {size // GRID}")
    frames = gen.record.frames
    if gen.config.latent_frames != 1 + (frames - 1) // 2:
        raise UsageError(f"{generator.path}: a window of {gen.config.latent_frames} latent frames is "
                         f"not the {frames} frames it trained on")
    if gen.config.codebook_size != tok.config.codebook_size:
        raise UsageError(f"{generator.path} reads {gen.config.codebook_size} codes, {tokenizer.path} "
                         f"writes {tok.config.codebook_size}")
    text = caption_tokenizer(generator.path, generator.meta, gen.config.text.vocab_size)
    return gen, tok, text


# ----------------------------------------------------------------------------- files

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
    """The shipped model of a world: checkpoints/<world>/<kind>.safetensors, kind tokenizer
    or generator."""
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
    (format, stage, step, the train config) checked (check_common)."""
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
    """Copy a model.safetensors with its floating-point tensors in fp16: how checkpoints/<world>/ is
    made. A tokenizer's copy records the sha256 of the file it came from (exported_from_sha256). For
    a generator, `tokenizer` names the exported tokenizer it will be paired with: the file it was
    trained on, or that file's copy; its sha256 replaces the recorded one, which is kept as
    `trained_on_sha256`."""
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


# ----------------------------------------------------------------------- the two kinds of model

def tokenizer_meta(kind: str, config, step: int) -> dict[str, str]:
    return {"format": "phenaki", "stage": "1", "kind": kind,
            "config": json.dumps(dataclasses.asdict(config)), "step": str(step)}


def generator_meta(config: MaskGITConfig, step: int, text: CaptionTokenizer,
                   tokenizer_sha256: str) -> dict[str, str]:
    return {"format": "phenaki", "stage": "2", "kind": "maskgit",
            "config": json.dumps(dataclasses.asdict(config)), "step": str(step),
            "text_tokenizer": text.to_json(), "tokenizer_sha256": tokenizer_sha256}


def tokenizer_config(kind: str, config_json: str, where: str = "the tokenizer"):
    """A tokenizer's config of `kind` from its JSON, checked (JSON lists become the
    config's tuples)."""
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
    (check_model), then the model built and its tensors loaded."""
    found = header(path)
    return build(check_model(found, "1"), path), found.meta


def load_generator(path: str, tokenizer_path: str):
    """A stage-2 checkpoint and the tokenizer it was trained on -> (generator, caption tokenizer,
    stage-1 tokenizer, metadata), models in eval mode on the CPU. In order: both headers read,
    both files and their pairing (the tokenizer file's sha256) checked together in one call
    (check_pair, which builds each model on the meta device), and only then the models built and
    their tensors read."""
    generator = header(path)
    tokenizer = header(tokenizer_path)
    gen, tok, text = check_pair(generator, tokenizer, file_digest(tokenizer_path))
    return build(gen, path), text, build(tok, tokenizer_path), generator.meta


def init_config(path: str, tokenizer_path: str, model_cfg: MaskGITConfig) -> MaskGITConfig:
    """The config of the generator file a fine-tune starts from (train.py --init), checked with the
    tokenizer it will train behind (check_pair): the file must have been trained on that tokenizer,
    and its window must be the one this run's clips make (`model_cfg`'s)."""
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
    """The generator's config fitted to the stage-1 checkpoint it will train behind: its vocabulary
    must equal the codebook, and its window is the clip length and image size of stage 2.
    same_data: refuse data other than the tokenizer's (stage 2 without --data would quietly train
    on the preset's)."""
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
