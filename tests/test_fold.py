"""fold.py: folding a finished tokenizer's near-copy codes at a chosen cosine, and what it refuses."""

import dataclasses
import json
import math
import os

import pytest
import torch

from kit import fold
from kit.checkpoint import (TOKENIZERS, file_digest, load_checkpoint, load_tokenizer,
                            save_checkpoint, tokenizer_meta)
from kit.config import TrainConfig
from vqgan import VQGANConfig


def paired_book(tmp_path, dtype=torch.float32) -> str:
    """A tiny VQGAN whose 16 codes are 8 orthogonal ones and, for each, a copy at cosine 0.92 turned
    towards the next: a fold at 0.95 keeps all 16, one at 0.9 leaves one code of each pair."""
    torch.manual_seed(0)
    config = VQGANConfig(widths=(8, 16, 16), codebook_size=16, code_dim=8)
    model = TOKENIZERS["vqgan"](config)
    base = torch.eye(8)  # (8, c)
    turn = math.acos(0.92)
    copies = math.cos(turn) * base + math.sin(turn) * base.roll(1, dims=1)  # (8, c)
    model.quantizer.codebook.data.copy_(torch.cat([base, copies]))
    train = TrainConfig(data="shapes", frames=3, image_size=16, batch_size=2)
    meta = tokenizer_meta("vqgan", config, step=5) | {"train_config": json.dumps(dataclasses.asdict(train)),
                                                      "exported_from_sha256": "0" * 64}
    path = str(tmp_path / "tok.safetensors")
    save_checkpoint(path, {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()},
                    meta)
    return path


def test_a_lower_cosine_folds_more_codes_and_a_folded_code_decodes_as_its_owner(tmp_path):
    src = paired_book(tmp_path)
    kept = fold.fold_file(src, str(tmp_path / "f95.safetensors"), cosine=0.95, clips=4)
    left = fold.fold_file(src, str(tmp_path / "f90.safetensors"), cosine=0.9, clips=4)
    assert (kept, left) == (16, 8)
    model, meta = load_tokenizer(str(tmp_path / "f90.safetensors"))
    alias = model.quantizer.alias
    # each pair became one code: its owner stands for itself, the other index names the owner
    assert alias.unique().numel() == 8 and torch.equal(alias[alias], alias)
    for k in range(8):
        assert alias[k] == alias[k + 8]
    every = torch.arange(16).view(1, 1, 4, 4)  # (B, t, h, w): each index once
    assert torch.equal(model.decode(every), model.decode(alias[every]))
    video = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    assert set(model.encode(video).unique().tolist()) <= set(alias.unique().tolist())
    assert meta["codes_left"] == "8" and json.loads(meta["fold_cosine"]) == 0.9
    assert meta["folded_from_sha256"] == file_digest(src) and meta["step"] == "5"
    assert "exported_from_sha256" not in meta


def test_a_folded_fp16_tokenizer_stays_fp16(tmp_path):
    src = paired_book(tmp_path, dtype=torch.float16)
    fold.fold_file(src, str(tmp_path / "f.safetensors"), cosine=0.9, clips=4)
    before, _ = load_checkpoint(src)
    after, _ = load_checkpoint(str(tmp_path / "f.safetensors"))
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in before.items()}


@pytest.mark.parametrize("case", ["same path", "hard link", "folder", "cosine 0", "cosine 1.5", "no clips"])
def test_fold_refuses_in_one_line_and_leaves_its_input_as_it_was(tmp_path, capsys, case):
    src = paired_book(tmp_path)
    digest = file_digest(src)
    dst = str(tmp_path / "out.safetensors")
    flags = ["--cosine", "0.9"]
    if case == "same path":
        dst = src
    elif case == "hard link":
        dst = str(tmp_path / "link.safetensors")
        os.link(src, dst)
    elif case == "folder":
        dst = str(tmp_path)
    elif case == "cosine 0":
        flags = ["--cosine", "0"]
    elif case == "cosine 1.5":
        flags = ["--cosine", "1.5"]
    else:
        flags += ["--clips", "0"]
    with pytest.raises(SystemExit) as leave:
        fold.main([src, dst, *flags])
    err = capsys.readouterr().err
    assert leave.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert file_digest(src) == digest
    # nothing was written: not the named file, nor a file beside a refused folder or link
    assert not os.path.exists(tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == sorted(["tok.safetensors"] + (case == "hard link") * ["link.safetensors"])
