import json
import os

import av
import numpy as np
import pytest
from safetensors.torch import load_file

import evaluate
import sample
import train
from data import ShapesSource, write_video
from test_train import TINY, TINY_GENERATOR


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


# ----------------------------------------------------------------------------- stage 2

@pytest.fixture(scope="module")
def generator(tokenizer, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen"))
    train.main(["--stage", "2", "--tokenizer-checkpoint", tokenizer, "--out", out, "--max-steps", "2",
                "--image-ratio", "0.5", *TINY_GENERATOR])
    return os.path.join(out, "model.safetensors")


def test_stage2_training_logs_samples_and_oracle_checks(generator):
    folder = os.path.dirname(generator)
    records = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
    assert [r["step"] for r in records] == [1, 2] and "val_color" in records[-1]
    assert os.path.exists(os.path.join(folder, "samples.png"))
    assert len(os.listdir(os.path.join(folder, "token_cache"))) == 1  # one shard for one rank


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".png"])
def test_sample_writes_a_playable_file(generator, tokenizer, tmp_path, capsys, suffix):
    out = str(tmp_path / f"story{suffix}")
    sample.main(["a red circle moving right", "a red circle moving down", "--out", out, "--seed", "1", "--steps", "2",
                 "--checkpoint", generator, "--tokenizer-checkpoint", tokenizer])
    printed = capsys.readouterr().out
    assert "frames: 5" in printed  # a window of 3 frames, then 2 more for the second prompt
    if suffix == ".png":
        assert plt_image_shape(out) == (32, 5 * 32)
        return
    with av.open(out) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)


def plt_image_shape(path: str) -> tuple[int, int]:
    import matplotlib.pyplot as plt
    return plt.imread(path).shape[:2]


def test_sample_is_reproducible_and_warns_about_unseen_words(generator, tokenizer, tmp_path, capsys):
    outs = [str(tmp_path / f"dog{i}.mp4") for i in range(2)]
    for out in outs:
        sample.main(["a dog running", "--out", out, "--seed", "3", "--steps", "2", "--checkpoint", generator,
                     "--tokenizer-checkpoint", tokenizer])
    err = capsys.readouterr().err
    assert "never saw these words in training: dog, running" in err
    assert open(outs[0], "rb").read() == open(outs[1], "rb").read()


def test_sample_continues_an_image(generator, tokenizer, tmp_path, capsys):
    image = str(tmp_path / "frame.png")
    import matplotlib.pyplot as plt
    plt.imsave(image, ShapesSource(frames=1, size=32).load(0)[0][0])
    out = str(tmp_path / "anim.mp4")
    sample.main(["a blue square moving up", "--init", image, "--frames", "5", "--out", out, "--steps", "2",
                 "--checkpoint", generator, "--tokenizer-checkpoint", tokenizer])
    assert "frames: 5" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["", "--steps", "2"], "prompt is empty"),
    (["a red circle", "--out", "/proc/nope/x.mp4"], "cannot write"),
    (["a red circle", "--out", "x.avi"], "must end in"),
])
def test_sample_refuses_bad_input_in_one_line(generator, tokenizer, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(argv + ["--checkpoint", generator, "--tokenizer-checkpoint", tokenizer])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_generator_vocabulary_must_match_the_tokenizer(tokenizer, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--stage", "2", "--tokenizer-checkpoint", tokenizer, "--out", str(tmp_path), *TINY_GENERATOR,
                    "--set", "model.codebook_size=64"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "must equal the tokenizer's codebook size (32)" in err


def test_stage2_resume_matches_an_uninterrupted_run(tokenizer, tmp_path):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    common = ["--stage", "2", "--tokenizer-checkpoint", tokenizer, *TINY_GENERATOR, "--set", "train.image_every=100"]
    train.main(common + ["--out", whole, "--max-steps", "4"])
    train.main(common + ["--out", split, "--max-steps", "2"])
    train.main(common + ["--out", split, "--max-steps", "4", "--resume"])
    a = load_file(os.path.join(whole, "model.safetensors"))
    b = load_file(os.path.join(split, "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
