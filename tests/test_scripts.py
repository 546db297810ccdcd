import json
import os

import av
import numpy as np
import pytest

import evaluate
import sample
import train
from data import ShapesSource, write_video
from test_train import TINY


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    train.main(["--stage", "1", "--out", out, "--max-steps", "2", *TINY])
    return os.path.join(out, "model.safetensors")


def test_evaluate_reports_stage1_figures(tokenizer, tmp_path, capsys):
    path = str(tmp_path / "eval.json")
    evaluate.main([tokenizer, "--clips", "4", "--json", path])
    printed = capsys.readouterr().out
    figures = json.load(open(path))
    for name in ("psnr", "ssim", "codebook_use", "perplexity"):
        assert f"{name}: " in printed
    assert 0 < figures["codebook_use"] <= 1 and figures["clips"] == 4


def test_reconstruct_writes_a_video_and_prints_quality(tokenizer, tmp_path, capsys):
    clip = str(tmp_path / "clip.mp4")
    write_video(clip, ShapesSource(frames=9, size=48).load(0)[0], fps=8)
    out = str(tmp_path / "recon.mp4")
    sample.main(["--reconstruct", clip, "--out", out, "--tokenizer-checkpoint", tokenizer])
    printed = capsys.readouterr().out
    assert "psnr: " in printed and "ssim: " in printed
    with av.open(out) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)  # resized to the tokenizer's 32 x 32


@pytest.mark.parametrize("make_bad", ["missing", "not_safetensors"])
def test_bad_checkpoint_is_a_one_line_error(tmp_path, capsys, make_bad):
    bad = str(tmp_path / "bad.safetensors")
    if make_bad == "not_safetensors":
        open(bad, "wb").write(np.random.default_rng(0).bytes(100))
    clip = str(tmp_path / "clip.mp4")
    write_video(clip, ShapesSource(frames=3, size=32).load(0)[0])
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--reconstruct", clip, "--out", str(tmp_path / "r.mp4"), "--tokenizer-checkpoint", bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
