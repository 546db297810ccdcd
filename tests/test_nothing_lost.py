"""Nothing lost, nothing silent: --resume reads one train state and refuses to start afresh over a model,
sample.py never writes over its own input, and what changes a cached clip or caption changes the cache.
Tiny runs (3-frame 32 x 32 clips); CPU only."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import sample
import train
from checkpoint import STATE
from tests.test_train import TINY, run_cli
from video import write_video


def test_resume_without_a_train_state_is_refused_and_the_model_stays(tmp_path):
    """A folder with model.safetensors alone (a shared or exported model): --resume would start at step 0
    and overwrite it. It is one line and exit 2, and the file is untouched."""
    out = str(tmp_path / "run")
    train.main(["--stage", "1", "--out", out, "--max-steps", "2", *TINY])
    for name in (STATE, STATE + ".prev", "model.safetensors.prev"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    model = os.path.join(out, "model.safetensors")
    before = open(model, "rb").read()
    result = run_cli("--stage", "1", "--out", out, "--resume", "--max-steps", "4", *TINY)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert STATE in result.stderr and "missing" in result.stderr
    assert open(model, "rb").read() == before


def test_a_torn_newest_train_state_resumes_config_and_weights_from_the_previous_one(tmp_path, capsys):
    """The run's config comes from the same file as its weights: the .prev train state, not the preset."""
    out = str(tmp_path / "run")
    flags = ["--stage", "1", "--out", out, *TINY, "--set", "train.save_every=1", "--set", "train.batch_size=3"]
    train.main(flags + ["--max-steps", "2"])
    with open(os.path.join(out, STATE), "r+b") as f:  # the newest train state torn in half
        f.truncate(os.path.getsize(os.path.join(out, STATE)) // 2)
    capsys.readouterr()
    train.main(["--stage", "1", "--out", out, "--resume", "--max-steps", "3", "--device", "cpu"])
    printed = capsys.readouterr()
    assert "resuming from" in printed.err and f"{STATE}.prev" in printed.err
    assert "resumed from" in printed.out and "at step 1" in printed.out  # .prev was saved at step 1
    with safe_open(os.path.join(out, STATE), framework="pt") as f:
        saved = json.loads(f.metadata()["train_config"])
    assert saved["batch_size"] == 3 and saved["frames"] == 3, "the run's own config, not the preset's"


@pytest.mark.parametrize("flag", ["--reconstruct", "--init"])
def test_sample_never_writes_over_its_input(flag, tmp_path, capsys):
    clip = str(tmp_path / "clip.mp4")
    write_video(clip, (torch.rand(3, 5, 32, 32) * 2 - 1), fps=8)
    before = open(clip, "rb").read()
    os.link(clip, str(tmp_path / "same.mp4"))  # the same file under another name
    for out in (clip, os.path.join(str(tmp_path), ".", "clip.mp4"), str(tmp_path / "same.mp4")):
        args = [flag, clip, "--out", out] + (["a dog running", "--frames", "9"] if flag == "--init" else [])
        with pytest.raises(SystemExit) as exit_info:
            sample.main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "is the input" in err and err.count("\n") == 1
    assert open(clip, "rb").read() == before
