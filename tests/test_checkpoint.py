import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from kit.checkpoint import (TOKENIZERS, file_digest, load_checkpoint, load_tokenizer,
                            save_checkpoint, shipped, tokenizer_meta)
from vqgan import VQGANConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    config = VQGANConfig(widths=(8, 16, 16), codebook_size=32, code_dim=4)
    model = TOKENIZERS["vqgan"](config).eval()
    path = str(tmp_path / "model.safetensors")
    save_checkpoint(path, model.state_dict(), tokenizer_meta("vqgan", config, step=7))
    loaded, meta = load_tokenizer(path)
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    assert torch.equal(model.encode(video), loaded.encode(video))
    assert torch.equal(model.decode(model.encode(video)), loaded.decode(loaded.encode(video)))
    assert meta["step"] == "7" and meta["kind"] == "vqgan"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in load_file(path))


def export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kit.checkpoint", "export", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_export_writes_an_fp16_copy_and_repins_a_generator_to_its_tokenizer(tmp_path):
    tok, gen = str(tmp_path / "tok.safetensors"), str(tmp_path / "gen.safetensors")
    assert export(shipped("shapes", "tokenizer"), tok).returncode == 0
    result = export(shipped("shapes", "generator"), gen, "--tokenizer", tok)
    assert result.returncode == 0 and f"wrote: {gen}" in result.stdout
    tensors, meta = load_checkpoint(gen)
    assert all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    _, shipped_meta = load_checkpoint(shipped("shapes", "generator"))
    assert meta["tokenizer_sha256"] == file_digest(tok) and meta["trained_on_sha256"] == shipped_meta["tokenizer_sha256"]


def test_export_refuses_a_tokenizer_for_a_stage_1_file_in_one_line(tmp_path):
    tok = shipped("shapes", "tokenizer")
    result = export(tok, str(tmp_path / "x.safetensors"), "--tokenizer", tok)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a stage-2 generator" in result.stderr
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_export_keeps_the_pairing_it_refuses_another_worlds_tokenizer(tmp_path):
    """The Shapes generator exported with the Animals tokenizer would load as a pair; the codes differ."""
    out = str(tmp_path / "gen.safetensors")
    result = export(shipped("shapes", "generator"), out, "--tokenizer", shipped("animals", "tokenizer"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not the tokenizer" in result.stderr
    assert not os.path.exists(out)
    assert export(shipped("animals", "generator"), out, "--tokenizer", shipped("animals", "tokenizer")).returncode == 0
