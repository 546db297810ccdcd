"""Tests of sample.py and evaluate.py. They read checkpoints that the fixtures write directly (tiny,
untrained models with the metadata train.py writes), so that they test the scripts, not training."""
import json
import os

import av
import numpy as np
import pytest
import torch

import evaluate
import sample
from kit.checkpoint import file_digest, generator_meta, tokenizer_meta
from kit.config import TrainConfig
from kit.runs import save_weights
from media.video import write_video
from maskgit import MaskGIT, MaskGITConfig
from text_encoder import CaptionTokenizer, TextEncoderConfig
from vqgan import VQGAN, VQGANConfig
from worlds.shapes import ShapesSource, caption, random_spec

# the window of both models: 3-frame clips (2 latent frames) of 32 x 32 pixels (4 x 4 codes)
WINDOW = TrainConfig(frames=3, image_size=32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """A tiny VQGAN of 32 codes in a stage-1 model.safetensors."""
    folder = str(tmp_path_factory.mktemp("tokenizer"))
    torch.manual_seed(0)
    config = VQGANConfig(widths=(8, 16, 16), codebook_size=32, code_dim=4)
    save_weights(folder, tokenizer_meta("vqgan", config, step=2), WINDOW, VQGAN(config).state_dict())
    return os.path.join(folder, "model.safetensors")


@pytest.fixture(scope="module")
def generator(tokenizer, tmp_path_factory) -> str:
    """A tiny MaskGIT paired with `tokenizer`, its caption BPE trained on Shapes captions."""
    folder = str(tmp_path_factory.mktemp("generator"))
    torch.manual_seed(0)
    text_cfg = TextEncoderConfig(vocab_size=300, dim=32, depth=1, heads=2, mlp=64)
    config = MaskGITConfig(codebook_size=32, latent_frames=2, grid=4, dim=32, depth=1, heads=2, mlp=64, text=text_cfg)
    rng = np.random.default_rng(0)
    text = CaptionTokenizer.train([caption(random_spec(rng)) for _ in range(200)], text_cfg.vocab_size)
    meta = generator_meta(config, step=2, text=text, tokenizer_sha256=file_digest(tokenizer))
    save_weights(folder, meta, WINDOW, MaskGIT(config).state_dict())
    return os.path.join(folder, "model.safetensors")


def test_evaluate_reports_stage1_figures(tokenizer, tmp_path, capsys):
    path = str(tmp_path / "eval.json")
    evaluate.main([tokenizer, "--clips", "4", "--json", path])
    printed = capsys.readouterr().out
    figures = json.load(open(path))
    for name in ("psnr", "ssim", "codebook_use", "perplexity"):
        assert f"{name}: " in printed
    assert 0 < figures["codebook_use"] <= 1 and figures["clips"] == 4


@pytest.mark.parametrize("length", [9, 5, 8, 10, 1])  # windows of 3: 3+3+3, 3+2, 3+3+2, 3+3+3+1, 1
def test_reconstruct_gives_back_every_frame_and_prints_quality(tokenizer, tmp_path, capsys, length):
    clip = str(tmp_path / "clip.mp4")
    write_video(clip, ShapesSource(frames=length, size=48).load(0)[0], fps=8)
    out = str(tmp_path / "recon.mp4")
    sample.main(["--reconstruct", clip, "--out", out, "--tokenizer-checkpoint", tokenizer])
    printed = capsys.readouterr().out
    assert "psnr: " in printed and "ssim: " in printed and f"frames: {length}" in printed
    with av.open(out) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == length and frames[0].shape == (32, 32, 3)  # resized to the tokenizer's 32 x 32


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


def test_world_flag_picks_that_worlds_shipped_pair(tmp_path, capsys):
    out = str(tmp_path / "red.png")
    sample.main(["a red circle moving right", "--world", "shapes", "--steps", "2", "--out", out])
    printed = capsys.readouterr()
    assert "frames: 11" in printed.out and "never saw" not in printed.err  # the Shapes pair knows these words
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["a red circle", "--world", "mars"])
    assert exit_info.value.code == 2  # argparse's own refusal of an unknown choice


def test_scale_draws_each_pixel_as_a_block(generator, tokenizer, tmp_path):
    out = str(tmp_path / "big.png")
    sample.main(["a red circle moving right", "--out", out, "--steps", "2", "--scale", "3",
                 "--checkpoint", generator, "--tokenizer-checkpoint", tokenizer])
    import matplotlib.pyplot as plt
    grid = plt.imread(out)
    assert grid.shape[:2] == (3 * 32, 3 * 3 * 32)  # one row of 3 frames of 32 x 32, each pixel 3 x 3
    assert (grid[0::3] == grid[1::3]).all() and (grid[:, 0::3] == grid[:, 2::3]).all()


def test_samples_makes_that_many_different_videos_in_one_run(generator, tokenizer, tmp_path, capsys):
    out = str(tmp_path / "dog.mp4")
    sample.main(["a red circle moving right", "--samples", "3", "--out", out, "--steps", "2", "--frames", "5",
                 "--checkpoint", generator, "--tokenizer-checkpoint", tokenizer])
    printed = capsys.readouterr().out
    paths = [str(tmp_path / f"dog-{i}.mp4") for i in range(3)]
    assert "frames: 5 in each of 3 videos" in printed and not os.path.exists(out)
    videos = []
    for path in paths:
        with av.open(path) as container:
            videos.append(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))
    assert all(len(v) == 5 for v in videos)
    assert not np.array_equal(videos[0], videos[1]) and not np.array_equal(videos[1], videos[2])  # each its own draw


def test_a_keep_beyond_the_window_is_clamped_with_a_note(generator, tokenizer, tmp_path, capsys):
    sample.main(["a red circle moving right", "--keep", "7", "--frames", "7", "--out", str(tmp_path / "k.mp4"),
                 "--steps", "2", "--checkpoint", generator, "--tokenizer-checkpoint", tokenizer])
    printed = capsys.readouterr().out
    assert "note: --keep 7 leaves no room" in printed and "keeping 1" in printed and "frames: 7" in printed


@pytest.mark.parametrize("world, cut", [("shapes", 1), ("animals", None)])
def test_a_story_cut_gives_the_context_the_generators_world_taught(world, cut, tmp_path, monkeypatch):
    """Behind a Shapes generator (its clips never change their motion) a cut to the next prompt gives the
    last frame alone; behind Animals (its story clips switch action) the whole context, as within a prompt."""
    class Stop(Exception):
        pass

    def stream_video(model, tokenizer, prompts, frames, init, keep, keep_at_cut, **sampling):
        seen.append(keep_at_cut)
        raise Stop

    seen = []
    monkeypatch.setattr(sample, "stream_video", stream_video)
    with pytest.raises(Stop):
        sample.main(["a red circle moving right", "a red circle moving left", "--world", world,
                     "--out", str(tmp_path / "story.mp4")])
    assert seen == [cut] and not os.path.exists(tmp_path / "story.mp4")


def test_evaluate_reports_stage2_figures_with_long_videos(generator, tokenizer, tmp_path, capsys):
    path = str(tmp_path / "gen.json")
    evaluate.main([generator, "--tokenizer-checkpoint", tokenizer, "--prompts", "4", "--stories", "2", "--steps", "2",
                   "--json", path])
    figures = json.load(open(path))
    for key in ("color", "shape", "direction", "one_object", "story_direction", "long_two_objects", "long_partial",
                "long_direction", "long_story_direction", "long_story_one_object", "long_story_kept"):
        assert 0 <= figures[key] <= 1, key
    printed = capsys.readouterr().out
    assert "long_story_kept: " in printed and figures["prompts"] == 4 and figures["stories"] == 2
