"""
Fold a tokenizer's near-copy codes: count which codes the clips of a world use, then merge every
code within a cosine threshold of a more used one into that code
(VectorQuantizer.merge_near_duplicates).

    python fold.py checkpoints/animals/tokenizer.safetensors runs/fold/animals-0.9.safetensors \
        --cosine 0.9

Dead-code restarts refill a codebook from recent encoder outputs, so a book ends with many copies of
its commonest content (black, on Shapes). To a decoder they are one picture; to the generator they
are many words for one thing, and it spends its capacity guessing between them. train.py folds at
`train.fold_cosine` (0.95 in the tiny stage-1 preset) when a run ends. This script folds a finished
tokenizer again at a lower threshold, with no retraining: each step down merges codes that decode
less alike, which lowers the vocabulary's perplexity and costs reconstruction quality (evaluate.py
measures both). A folded code keeps its index and decodes as its owner, so the codebook size, and
with it a generator's vocabulary, stays the same.

The codes are counted on the tokenizer's own training data (its train_config's --data, clip length
and size), at the run's seed: the same clips train.py counts at the end of a run.
"""

import argparse
import json
import math

import torch
import torch.nn as nn

from data import make_source
from kit.checkpoint import (file_digest, load_checkpoint, load_tokenizer, save_checkpoint,
                            train_record)
from kit.faults import UsageError, exit_usage
from kit.outputs import check_destination
from kit.stream import ClipStream


@torch.no_grad()
def code_usage(model: nn.Module, source, clips: int, batch_size: int,
               device: torch.device) -> torch.Tensor:
    """How often each code of the book encodes `clips` clips of a source -> counts (K,)."""
    usage = torch.zeros_like(model.quantizer.counts)  # (K,)
    stream = ClipStream(source, batch_size)
    training = model.training
    # eval mode: the quantizer neither counts its own uses nor restarts codes while we count
    model.eval()
    for b in range(math.ceil(clips / batch_size)):
        codes = model.encode(stream.batch(b)["video"].to(device))  # (B, t, h, w)
        usage += torch.bincount(codes.flatten(), minlength=usage.numel())
    model.train(training)
    return usage


def fold_codes(model: nn.Module, source, cosine: float, batch_size: int, device: torch.device,
               clips: int = 512) -> int:
    """Fold every code within `cosine` of a more used one (use counted on `clips` clips).
    -> the number of codes left."""
    usage = code_usage(model, source, clips, batch_size, device)
    return model.quantizer.merge_near_duplicates(usage, cosine)


def fold_file(src: str, dst: str, cosine: float, clips: int) -> int:
    """Fold the tokenizer in `src` at `cosine` and write it to `dst` -> codes left. Every tensor
    keeps its dtype (an fp16 export stays fp16); the metadata records the fold and its source."""
    if not 0 < cosine <= 1:
        raise UsageError(f"--cosine must lie in (0, 1], got {cosine}")
    if clips < 1:
        raise UsageError(f"--clips must be at least 1, got {clips}")
    check_destination(dst, [src])
    model, meta = load_tokenizer(src)
    trained = train_record(meta.get("train_config", "{}"), src)
    source = make_source(trained.data, trained.frames, trained.image_size, trained.seed,
                         trained.fps, "train", trained.crop)
    left = fold_codes(model, source, cosine, trained.batch_size, torch.device("cpu"), clips)
    stored, _ = load_checkpoint(src)
    tensors = {}
    for name, tensor in model.state_dict().items():
        # a book saved before folds existed has no alias: it is written as the model holds it
        tensors[name] = tensor.to(stored[name].dtype) if name in stored else tensor
    folded = {
        "codes_left": str(left),
        "fold_cosine": json.dumps(cosine),
        "folded_from_sha256": file_digest(src),
    }
    # a folded book is not an exported copy of the file that one came from: a generator trained
    # behind that file must not pair with this one (checkpoint.export_half reads the field)
    meta = {k: v for k, v in meta.items() if k != "exported_from_sha256"}
    save_checkpoint(dst, tensors, meta | folded)
    return left


def main(argv: list[str] | None = None) -> None:
    about = "Fold a tokenizer's near-copy codes at a cosine threshold."
    p = argparse.ArgumentParser(prog="python -m kit.fold", description=about)
    p.add_argument("src", help="a stage-1 tokenizer (.safetensors)")
    p.add_argument("dst", help="where the folded copy goes")
    p.add_argument("--cosine", type=float, required=True, help="fold codes at least this similar")
    p.add_argument("--clips", type=int, default=512, help="clips the code use is counted on")
    args = p.parse_args(argv)
    try:
        left = fold_file(args.src, args.dst, args.cosine, args.clips)
    except (UsageError, OSError, ValueError) as err:
        exit_usage(err)
    print(f"codes_left: {left}")
    print(f"wrote: {args.dst}")


if __name__ == "__main__":
    main()
