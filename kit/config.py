"""
How a training run is configured: one `TrainConfig` for the run, the named sizes (presets) of both
stages, and the `--set key=value` overrides of the command line.

Each model file defines its own config dataclass (VQGANConfig, CViViTConfig, MaskGITConfig with its
TextEncoderConfig); this module only chooses values for them. A preset is a function returning a
pair (model config, train config):

    tokenizer_preset("tiny", "vqgan")  -> (VQGANConfig, TrainConfig)     stage 1
    generator_preset("paper")          -> (MaskGITConfig, TrainConfig)   stage 2

The sizes: `tiny` trains on two CPU cores in under an hour per stage (the shipped models), `base`
suits one GPU at 128 x 128, and `paper` is Phenaki's: a C-ViViT of 4 spatial + 4 temporal layers,
width 512, 8 heads, MLP 2048 and 8192 codes of dimension 32 (or the seed's 43M VQGAN), and a 1.73B
generator of 24 layers, width 2048 and 32 heads.

Overrides name a field as `model.<field>` or `train.<field>` (`model.text.<field>` reaches the
caption encoder inside the generator's config); the value is parsed by the field's type
(`model.widths=8,16,16` for a tuple, `train.lr=3e-4`). An unknown key is a mistake, and so is a key
that only the other stage reads (`train.gan_start` in stage 2): both are a `UsageError`, one line
and exit code 2, never a setting silently ignored.
"""

import argparse
import dataclasses
import difflib
from dataclasses import dataclass

from cvivit import CViViTConfig
from kit.faults import UsageError
from maskgit import POSITIONS, MaskGITConfig
from text_encoder import TextEncoderConfig
from vqgan import NORMS, VQGANConfig


# the strings of a model config, each a choice
CHOICES = {"position": POSITIONS, "norm": NORMS}
# train.precision: bf16 autocast on CUDA alone, on any device, or nowhere
PRECISIONS = ("auto", "bf16", "fp32")


class HelpWithDefaults(argparse.HelpFormatter):
    """--help that shows each flag's default, where it has one and its
    help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


TOKENIZER_CONFIGS = {"vqgan": VQGANConfig, "cvivit": CViViTConfig}

# the largest guidance scale and temperature a sampler takes: each multiplies logits, and a larger
# factor can overflow fp32 (3.4e38) into a one-colour video; the paper uses 0.1 to 12 and 4 to 8
SAMPLING_MAX = 1000.0
# the most decoding steps a window takes
STEPS_MAX = 1000
# seeds are signed 64-bit numbers to torch.Generator
SEED_MAX = 2 ** 63 - 1


def check_sampling(steps: int, guidance: float, temperature: float, seed: int) -> None:
    """The sampling flags of sample.py and evaluate.py, each in its range, or a UsageError."""
    if not 1 <= steps <= STEPS_MAX:
        raise UsageError(f"--steps must lie in 1 to {STEPS_MAX}, got {steps}")
    for flag, value in (("--cfg", guidance), ("--temperature", temperature)):
        # NaN fails both comparisons
        if not 0 <= value <= SAMPLING_MAX:
            raise UsageError(f"{flag} must lie in 0 to {SAMPLING_MAX:g}, got {value}")
    if not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed must lie in 0 to 2^63 - 1, got {seed}")


def frame_shares(frames: int, prompts: int, have: int = 0) -> list[int]:
    """The new frames of each prompt's segment in a video of `frames` frames whose first `have` are
    given (--init): equal shares, the first ones a frame more where they do not divide. UsageError
    where a prompt would get none (serve.py asks the same of a page's request)."""
    new = frames - have
    if new < 1:
        raise UsageError(f"--init holds at least the {have} frames asked; raise --frames")
    if new < prompts:
        # each prompt gets frames of its own
        raise UsageError(f"--frames {frames} makes {new} new frame(s) for {prompts} prompts"
                         + (f" after --init's {have}" if have else "")
                         + f"; ask for at least --frames {have + prompts}")
    return [new // prompts + (i < new % prompts) for i in range(prompts)]


# Latent frames of context a story keeps at a cut (maskgit.plan_windows), by the world a generator
# was trained on: each world's KEEP_AT_CUT (worlds/), read here so that sample.py loads no world.
# A world whose clips never change their motion (Shapes) asks for the last frame alone.
KEEP_AT_CUT = {"shapes": 1, "animals": None}


def keep_at_cut(train_config: dict) -> int | None:
    """What the world a generator was trained on taught of cuts; None (the whole context) on real
    data."""
    return KEEP_AT_CUT.get(train_config.get("data"))


@dataclass
class TrainConfig:
    # "shapes", a video folder, tar shards or an image folder (data.make_source)
    data: str = "shapes"
    # held-out data for validation; "" holds out a share of data's files (data.VAL_SHARE)
    val_data: str = ""
    # how real frames become squares: "center" cuts the long side, "pad" letterboxes
    crop: str = "center"
    # clip length, 1 + 2n
    frames: int = 11
    # clips are resized and cropped to this square
    image_size: int = 64
    # frame rate clips are sampled at from real video
    fps: float = 8.0
    # clips per rank per micro-step
    batch_size: int = 8
    # micro-steps per optimizer step
    grad_accum: int = 1
    # optimizer steps in all
    max_steps: int = 3000
    # peak learning rate
    lr: float = 1e-3
    # the cosine decays to this
    min_lr: float = 1e-4
    # linear warm-up steps
    warmup: int = 200
    # AdamW decoupled weight decay
    weight_decay: float = 1e-4
    # AdamW beta2 (beta1 is 0.9), as the paper
    beta2: float = 0.99
    # max global gradient norm
    grad_clip: float = 1.0
    # EMA decay of the weights saved for sampling; 0 turns EMA off
    ema: float = 0.0
    # stage 1: steps between dead-code restarts
    restart_every: int = 50
    # stage 1: at the end, fold codes within this cosine of a more used one; 0: keep all
    fold_cosine: float = 0.0
    # stage 1: weight of the adversarial loss once it is on
    gan_weight: float = 0.1
    # stage 1: step at which the discriminator switches on
    gan_start: int = 1_000_000
    # stage 1: weight of the VGG loss, when --perceptual-weights is given
    perceptual_weight: float = 0.1
    # the steps' autocast: "auto" is bf16 on CUDA and fp32 on the CPU; "bf16" on the CPU too (on one
    # with avx512_bf16 in lscpu, steps ran 1.3-1.5x faster: docs/speed.md); "fp32" everywhere
    precision: str = "auto"
    # seeds the model init, the data order and every step's RNG
    seed: int = 0
    # steps between log.jsonl lines
    log_every: int = 50
    # steps between checkpoints
    save_every: int = 500
    # steps between loss-curve and sample PNGs
    image_every: int = 500
    # DataLoader worker processes per rank
    workers: int = 0
    # stage 2: clips encoded into the token cache (all of a smaller dataset)
    cache_clips: int = 20_000
    # stage 2: share of samples trained as images (their first latent frame alone)
    image_ratio: float = 0.0
    # stage 2: decoding steps of the sample grid and the alignment check in the log
    sample_steps: int = 24
    # stage 2: loss weight of codes that change from the latent frame before; 1: plain
    motion_weight: float = 1.0
    # stage 2: share of samples given their first 1..t-1 latent frames, the rest masked
    prefix_masks: float = 0.0
    # stage 2: latent frames those samples are given; 0 draws 1..t-1
    prefix_frames: int = 0


# the fields that one stage alone reads: setting one for the other stage is a mistake, not a no-op
STAGE_OF_FIELD = {"restart_every": 1, "fold_cosine": 1, "gan_weight": 1, "gan_start": 1,
                  "perceptual_weight": 1, "cache_clips": 2, "image_ratio": 2, "sample_steps": 2,
                  "motion_weight": 2, "prefix_masks": 2, "prefix_frames": 2}


def tokenizer_preset(name: str, tokenizer: str) -> tuple[VQGANConfig | CViViTConfig, TrainConfig]:
    """Stage-1 sizes. tiny: two CPU cores in under 45 minutes. base: one GPU. paper: the paper's
    C-ViViT (4 + 4 layers, width 512, 8 heads, MLP 2048, 8192 codes of dim 32) and the seed's
    43M VQGAN."""
    if tokenizer not in TOKENIZER_CONFIGS:
        raise UsageError(f"unknown tokenizer {tokenizer!r}; choose one of {sorted(TOKENIZER_CONFIGS)}")
    vqgan = tokenizer == "vqgan"
    if name == "tiny":
        if vqgan:
            model = VQGANConfig(widths=(32, 64, 128), codebook_size=1024, code_dim=16)
        else:
            model = CViViTConfig(dim=128, spatial_depth=2, temporal_depth=2, heads=4, mlp=512,
                                 codebook_size=1024, code_dim=16)
        # the VQGAN is stable at 3e-4 but not at 1e-3 (its reconstructions fall back to grey). Most
        # of its 1024 codes are near-copies of black, folded into one at the end of training
        lr, min_lr = (3e-4, 3e-5) if vqgan else (1e-3, 1e-4)
        return model, TrainConfig(max_steps=8000, lr=lr, min_lr=min_lr, save_every=250,
                                  fold_cosine=0.95)
    if name == "base":
        if vqgan:
            model = VQGANConfig(widths=(64, 128, 256), res_blocks=2, codebook_size=4096, code_dim=32)
        else:
            # its position grid is the clips' 128 pixels
            model = CViViTConfig(dim=256, spatial_depth=4, temporal_depth=4, heads=8, mlp=1024,
                                 image_size=128, codebook_size=4096, code_dim=32)
        return model, TrainConfig(image_size=128, batch_size=16, max_steps=100_000, lr=3e-4,
                                  min_lr=3e-5, warmup=2000, ema=0.999, gan_start=20_000, workers=8)
    if name == "paper":
        if vqgan:
            model = VQGANConfig(widths=(128, 256, 512), res_blocks=2, codebook_size=8192, code_dim=32)
        else:
            model = CViViTConfig(dim=512, spatial_depth=4, temporal_depth=4, heads=8, mlp=2048,
                                 image_size=128, codebook_size=8192, code_dim=32)
        return model, TrainConfig(image_size=128, batch_size=8, max_steps=100_000, lr=1e-4,
                                  min_lr=1e-5, warmup=5000, grad_clip=10.0, ema=0.999,
                                  gan_start=10_000, workers=8)
    raise UsageError(f"unknown preset {name!r}; choose tiny, base or paper")


def generator_preset(name: str) -> tuple[MaskGITConfig, TrainConfig]:
    """Stage-2 sizes. tiny: two CPU cores in under 90 minutes. base: one GPU. paper: Phenaki's 1.8B
    generator (24 layers, width 2048, 32 heads) over the paper's 8192 codes."""
    if name == "tiny":
        # 384 codes a clip make every step costly on a CPU: a narrow model and many cheap steps
        text = TextEncoderConfig(vocab_size=512, dim=128, depth=2, heads=4, mlp=512)
        return (MaskGITConfig(dim=128, depth=4, heads=4, mlp=512, text=text),
                TrainConfig(batch_size=32, max_steps=3500, lr=1e-3, min_lr=5e-5, warmup=200,
                            weight_decay=0.01, cache_clips=10_000, save_every=250, image_every=250))
    if name == "base":
        text = TextEncoderConfig(vocab_size=8192, dim=512, depth=6, heads=8, mlp=2048, max_len=64)
        return (MaskGITConfig(codebook_size=4096, grid=16, dim=768, depth=12, heads=12, mlp=3072,
                              text=text),
                TrainConfig(image_size=128, batch_size=32, max_steps=200_000, lr=4e-4, min_lr=4e-5,
                            warmup=5000, weight_decay=0.045, ema=0.9999, cache_clips=1_000_000,
                            image_ratio=0.2, workers=8))
    if name == "paper":
        text = TextEncoderConfig(vocab_size=32_000, dim=1024, depth=12, heads=16, mlp=4096, max_len=64)
        return (MaskGITConfig(codebook_size=8192, grid=16, dim=2048, depth=24, heads=32, mlp=8192,
                              text=text),
                TrainConfig(image_size=128, batch_size=16, max_steps=1_000_000, lr=1e-4,
                            min_lr=1e-5, warmup=10_000, weight_decay=0.045, ema=0.9999,
                            cache_clips=10_000_000, image_ratio=0.2, workers=8))
    raise UsageError(f"unknown preset {name!r}; choose tiny, base or paper")


def parse_value(key: str, value: str, current: object) -> object:
    """`value` as the type of the field's `current` value: a tuple from commas, a bool
    from 1/true/yes."""
    if dataclasses.is_dataclass(current):
        raise UsageError(f"{key} is a group of fields: set {key}.<field>=... one at a time")
    try:
        if isinstance(current, tuple):
            return tuple(type(current[0])(v) for v in value.split(","))
        if isinstance(current, bool):
            return value.lower() in ("1", "true", "yes")
        if isinstance(current, int):
            # 1e4 too, but not 3e-1: a whole number or nothing
            number = float(value)
            if not number.is_integer():
                raise UsageError(f"{key} takes a whole number, got {value!r}")
            return int(number)
        return type(current)(value)
    except (ValueError, OverflowError):
        raise UsageError(f"bad value {value!r} for {key}") from None


def override(config, assignments: list[str], prefix: str):
    """Apply the `prefix.field=value` items of `assignments` to a dataclass -> a new one; other
    prefixes are left for another call. A nested config (model.text) takes
    `prefix.text.field=value`."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not key.startswith(prefix + "."):
            continue
        name = key[len(prefix) + 1:]
        head, dot, _ = name.partition(".")
        if dot and head in fields and dataclasses.is_dataclass(getattr(config, head)):
            # a nested config
            changes[head] = override(changes.get(head, getattr(config, head)), [item],
                                     f"{prefix}.{head}")
            continue
        if not sep or name not in fields:
            near = difflib.get_close_matches(name, list(fields), n=1)
            raise UsageError(f"unknown config key {key!r}; " + (f"did you mean {prefix}.{near[0]}? " if near else "")
                             + f"known: {', '.join(prefix + '.' + f for f in fields)}")
        changes[name] = parse_value(key, value, getattr(config, name))
    return dataclasses.replace(config, **changes)


# what --set may change when a run resumes: the schedule's length and peak, and how often it reports
RESUMABLE = {"max_steps", "lr", "min_lr", "log_every", "image_every", "save_every", "sample_steps",
             "grad_clip", "motion_weight", "prefix_masks", "prefix_frames", "precision"}


def resume_changes(saved: tuple, asked: tuple) -> list[str]:
    """(model config, TrainConfig) as saved and as the resuming command asks -> a note for each
    resumable train key that changes; any other change is a UsageError (the weights or the data
    would not fit)."""
    notes = []
    for prefix, old, new in (("model", saved[0], asked[0]), ("train", saved[1], asked[1])):
        for f in dataclasses.fields(old):
            a = getattr(old, f.name)
            b = getattr(new, f.name)
            if a == b:
                continue
            if prefix == "model" or f.name not in RESUMABLE:
                raise UsageError(f"{prefix}.{f.name} cannot change on resume (the run has {a}, this command {b}); "
                                 "resume without it, or start a new --out")
            notes.append(f"note: {prefix}.{f.name} changes from {a} to {b} on resume")
    return notes


def configure(stage: int, preset: str, tokenizer: str, assignments: list[str],
              max_steps: int | None = None) -> tuple[object, TrainConfig]:
    """The preset of a stage with the `--set` assignments and --max-steps applied -> (model config,
    train config). A run shorter than its preset warms up in proportion (400 of 8000 steps: 10
    warm-up steps, not 200), however its length was given, unless train.warmup is set."""
    for item in assignments:
        key = item.partition("=")[0]
        if not key.startswith(("model.", "train.")):
            near = difflib.get_close_matches(key, [f"train.{f.name}" for f in dataclasses.fields(TrainConfig)], n=1)
            raise UsageError(f"unknown config key {key!r}: keys start with model. or train."
                             + (f" Did you mean {near[0]}?" if near else ""))
        field = key.removeprefix("train.")
        if key.startswith("train.") and STAGE_OF_FIELD.get(field, stage) != stage:
            raise UsageError(f"{key} is read by stage {STAGE_OF_FIELD[field]} only, and this is stage {stage}")
    if stage == 1:
        model_cfg, base = tokenizer_preset(preset, tokenizer)
    else:
        model_cfg, base = generator_preset(preset)
    model_cfg = override(model_cfg, assignments, "model")
    cfg = override(base, assignments, "train")
    cfg = dataclasses.replace(cfg, max_steps=max_steps or cfg.max_steps)
    if cfg.max_steps < base.max_steps and not any(a.startswith("train.warmup=") for a in assignments):
        cfg = dataclasses.replace(cfg,
                                  warmup=max(1,
                                             round(base.warmup * cfg.max_steps / base.max_steps)))
    for name, choices in CHOICES.items():
        if getattr(model_cfg, name, choices[0]) not in choices:
            raise UsageError(f"model.{name} must be one of {', '.join(choices)}, got {getattr(model_cfg, name)!r}")
    if cfg.precision not in PRECISIONS:
        raise UsageError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    return model_cfg, cfg
