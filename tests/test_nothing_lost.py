"""Nothing lost, nothing silent: --resume reads one train state and refuses to start afresh over a model,
sample.py never writes over its own input, and what changes a cached clip or caption changes the cache.
Tiny runs (3-frame 32 x 32 clips); CPU only."""

import json
import os
import tempfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sample
import train
from kit.runs import STATE
from media.video import write_video
from tests.test_train import TINY, TINY_GENERATOR, run_cli


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


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> tuple[str, str]:
    """Two tiny stage-1 runs of different seeds: two tokenizers whose codes differ."""
    outs = []
    for seed in (0, 1):
        out = str(tmp_path_factory.mktemp(f"tok{seed}"))
        train.main(["--stage", "1", "--out", out, "--max-steps", "1", *TINY, "--set", f"train.seed={seed}"])
        outs.append(os.path.join(out, "model.safetensors"))
    return outs[0], outs[1]


def test_stage_2_resume_refuses_another_tokenizer(tokenizers, tmp_path):
    out = str(tmp_path / "gen")
    train.main(["--stage", "2", "--tokenizer-checkpoint", tokenizers[0], "--out", out, "--max-steps", "2", *TINY_GENERATOR])
    result = run_cli("--stage", "2", "--tokenizer-checkpoint", tokenizers[1], "--out", out, "--resume",
                     "--max-steps", "3", "--device", "cpu")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "not the tokenizer this run trained behind" in result.stderr


def caption_folder(root, captions: list[str]) -> str:
    """A folder of clips (one a caption) and its captions.csv, written unquoted as people write it."""
    from tests.test_own_videos import write_clip
    os.makedirs(root, exist_ok=True)
    for i in range(len(captions)):
        if not os.path.exists(os.path.join(root, f"c{i}.mp4")):
            write_clip(os.path.join(root, f"c{i}.mp4"), "h264", 32, 32, 2, seed=i)
    with open(os.path.join(root, "captions.csv"), "w") as f:
        f.write("".join(f"c{i}.mp4,{c}\n" for i, c in enumerate(captions)))
    return str(root)


def test_captions_keep_their_commas():
    from data import make_source
    root = caption_folder(tempfile.mkdtemp(), ["a dog, then a cat, running", "a bird"])
    texts = sorted(text for _, text in make_source(root, 3, 32).items)
    assert texts == ["a bird", "a dog, then a cat, running"]


def test_an_edited_caption_file_reaches_the_token_cache_and_force_clears_it(tokenizers, tmp_path):
    from data import make_source
    from kit.stream import content_digest
    root = caption_folder(tmp_path / "clips", [f"a cat number {i}" for i in range(4)])
    before = content_digest(make_source(root, 3, 32))
    out = str(tmp_path / "gen")
    flags = ["--stage", "2", "--tokenizer-checkpoint", tokenizers[0], "--data", root, "--out", out, "--max-steps", "1",
             *TINY_GENERATOR, "--set", "train.image_every=100"]
    train.main(flags)
    caption_folder(tmp_path / "clips", [f"a dog number {i}" for i in range(4)])  # the user edits the captions
    assert content_digest(make_source(root, 3, 32)) != before
    train.main(flags + ["--force"])
    shard = os.path.join(out, "token_cache", os.listdir(os.path.join(out, "token_cache"))[0])
    with safe_open(shard, framework="pt") as f:
        cached = json.loads(f.metadata()["captions"])
    assert cached and all(c.startswith("a dog number") for c in cached), cached
    assert "a cat" not in "".join(cached)


def test_force_clears_the_old_runs_token_cache(tmp_path):
    from kit.runs import clear_run
    os.makedirs(tmp_path / "token_cache")
    (tmp_path / "token_cache" / "tokens-000-of-001.safetensors").write_bytes(b"old codes")
    (tmp_path / "notes.txt").write_text("the user's own file")
    clear_run(str(tmp_path))
    assert not (tmp_path / "token_cache").exists() and (tmp_path / "notes.txt").exists()


def video_with_long_audio(path: str, seconds: int = 3, audio_seconds: int = 12, fps: int = 8) -> None:
    """A video of `seconds` whose audio runs on to `audio_seconds`; frame t is grey level 9t."""
    import av
    import numpy as np
    webm = path.endswith(".webm")
    with av.open(path, "w") as container:
        video = container.add_stream("libvpx" if webm else "libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 32, 32, "yuv420p"
        audio = container.add_stream("libopus" if webm else "aac", rate=48000)
        for t in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 9 * t, np.uint8), format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        samples, n = (960 if webm else 1024), 0
        while n < audio_seconds * 48000:
            frame = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.float32), format="flt", layout="mono")
            frame.sample_rate, frame.pts, n = 48000, n, n + samples
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)


@pytest.mark.parametrize("ext", [".mkv", ".webm"])
def test_a_video_without_a_stream_duration_ends_where_its_frames_end_not_its_audio(ext, tmp_path):
    import numpy as np
    from media.video import read_video, video_seconds
    path = str(tmp_path / f"clip{ext}")
    video_with_long_audio(path)
    assert abs(video_seconds(path) - 3.0) < 0.2  # the container says 12 s
    clips = [read_video(path, 11, 32, 8.0, rng=np.random.default_rng(i)) for i in range(20)]  # none past the end
    assert all(len(c) == 11 for c in clips)
    first = read_video(path, 3, 32, 8.0)
    assert first[0].mean() < 8 and 5 < first[1].mean() < 14, "after measuring, decoding starts at the first frame"


def test_a_stage_1_train_state_records_the_clips_all_ranks_consumed(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--stage", "1", "--out", out, "--max-steps", "2", *TINY])  # batch 2, one rank
    with safe_open(os.path.join(out, STATE), framework="pt") as f:
        assert f.metadata()["clips_seen"] == "4"
    train.main(["--stage", "1", "--out", out, "--resume", "--max-steps", "4", "--device", "cpu"])
    with safe_open(os.path.join(out, STATE), framework="pt") as f:
        assert f.metadata()["clips_seen"] == "8"


def marked_video(path: str, width: int = 64, height: int = 48, aspect=None) -> np.ndarray:
    """A short H.264 video of one asymmetric picture (a white band on the left, a grey one at the top),
    its pixels `aspect` wide -> the picture (height, width, 3)."""
    import av
    img = np.zeros((height, width, 3), np.uint8)
    img[:, :width // 4] = 255
    img[:height // 4] = 128
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if aspect:
            stream.codec_context.sample_aspect_ratio = aspect
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return img


def with_matrix(src: str, dst: str, a: int, b: int, c: int, d: int) -> None:
    """A copy of an MP4 whose track header carries the display matrix [[a, b], [c, d]] (QuickTime layout)."""
    import struct
    data = open(src, "rb").read()
    identity = struct.pack(">9i", 1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)
    at = data.rfind(identity)  # the track's, after the movie header's
    matrix = struct.pack(">9i", a << 16, b << 16, 0, c << 16, d << 16, 0, 0, 0, 1 << 30)
    open(dst, "wb").write(data[:at] + matrix + data[at + 36:])


@pytest.mark.parametrize("name, matrix, shown", [
    ("mirrored", (-1, 0, 0, 1), lambda img: img[:, ::-1]),
    ("upside down mirror", (1, 0, 0, -1), lambda img: img[::-1]),
    ("turned 180", (-1, 0, 0, -1), lambda img: img[::-1, ::-1]),
    ("a phone's 90", (0, 1, -1, 0), lambda img: np.rot90(img, k=-1)),
    ("90 and mirrored", (0, 1, 1, 0), lambda img: img.transpose(1, 0, 2))])  # x' = y, y' = x
def test_the_display_matrix_is_honoured_flips_as_flips(name, matrix, shown, tmp_path):
    from media.video import read_video
    img = marked_video(str(tmp_path / "plain.mp4"))
    with_matrix(str(tmp_path / "plain.mp4"), str(tmp_path / "shown.mp4"), *matrix)
    frame = read_video(str(tmp_path / "shown.mp4"), 1)[0].astype(float)
    expected = np.ascontiguousarray(shown(img)).astype(float)
    assert frame.shape == expected.shape and np.abs(frame - expected).mean() < 12, name


def test_reading_a_video_leaves_no_frame_to_the_garbage_collector(tmp_path):
    """Frames freed by the cycle collector after a fork crashed DataLoader workers (a decoded frame caches
    its side data, which points back at it): each frame read must go with its last reference."""
    import gc
    from media.video import read_video
    marked_video(str(tmp_path / "plain.mp4"))
    with_matrix(str(tmp_path / "plain.mp4"), str(tmp_path / "shown.mp4"), -1, 0, 0, 1)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds stays in gc.garbage to be looked at
    try:
        read_video(str(tmp_path / "shown.mp4"), 3)
        gc.collect()
        left = sorted({type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("av")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def test_non_square_pixels_are_shown_at_their_displayed_proportions(tmp_path):
    """64 x 48 pixels 4/3 wide show as 85 x 48 (16:9): letterboxed into 64 x 64 the picture is 36 rows high."""
    from fractions import Fraction
    from media.video import read_video
    marked_video(str(tmp_path / "wide.mp4"), aspect=Fraction(4, 3))
    marked_video(str(tmp_path / "square.mp4"))
    rows = [int((read_video(str(tmp_path / f), 1, 64, crop="pad")[0].max(axis=(1, 2)) > 40).sum())
            for f in ("wide.mp4", "square.mp4")]
    assert abs(rows[0] - 36) <= 1 and abs(rows[1] - 48) <= 1, rows


@pytest.mark.parametrize("name", ["clips [2024]", "x.tarball", "a{b}", "what?", "star*"])
def test_a_folder_is_a_folder_whatever_its_name_holds(name, tmp_path):
    from data import VideoFolderSource, make_source
    root = caption_folder(tmp_path / name, ["a dog", "a cat"])
    source = make_source(root, 3, 32)
    assert type(source) is VideoFolderSource and len(source) == 2


def test_captions_csv_may_name_files_outside_the_folder(tmp_path):
    from data import make_source
    from tests.test_own_videos import write_clip
    root = caption_folder(tmp_path / "clips", ["a dog", "a cat"])
    write_clip(str(tmp_path / "outside.mp4"), "h264", 32, 32, 2)
    with open(os.path.join(root, "captions.csv"), "a") as f:
        f.write(f"../outside.mp4,a bird\n{tmp_path / 'outside.mp4'},a horse\n")
    source = make_source(root, 3, 32)
    assert sorted(text for _, text in source.items) == ["a bird", "a cat", "a dog", "a horse"]
    assert all(source.load(k)[0].shape == (3, 32, 32, 3) for k in range(4))


def test_what_is_measured_is_logged_even_off_the_log_steps(tokenizers, tmp_path):
    out = str(tmp_path / "gen")
    train.main(["--stage", "2", "--tokenizer-checkpoint", tokenizers[0], "--out", out, "--max-steps", "4",
                *TINY_GENERATOR, "--set", "train.log_every=2", "--set", "train.image_every=3"])
    lines = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert any(line["step"] == 3 and "val_loss" in line for line in lines), lines


def test_sample_refuses_prompts_that_would_get_no_frames(tmp_path, capsys):
    clip = str(tmp_path / "clip.mp4")
    write_video(clip, torch.rand(3, 9, 32, 32) * 2 - 1, fps=8)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["a dog running", "the dog jumps", "the dog sits down", "--init", clip, "--frames", "11",
                     "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "for 3 prompts" in err and "--frames 12" in err and err.count("\n") == 1


def test_broken_held_out_files_leave_the_run_training_without_val_figures(tmp_path):
    """One good video and three broken ones, of which the name hash holds out a broken one: the run trains."""
    from data import held_out
    from tests.test_own_videos import write_clip
    names = ["cut.mp4", "empty.mp4", "good.mp4", "junk.mp4"]
    assert not dict(zip(names, held_out(names)))["good.mp4"]
    root = tmp_path / "mixed"
    os.makedirs(root)
    write_clip(str(root / "good.mp4"), "h264", 32, 32, 2)
    (root / "empty.mp4").write_bytes(b"")
    (root / "junk.mp4").write_bytes(os.urandom(5000))
    (root / "cut.mp4").write_bytes(open(root / "good.mp4", "rb").read()[:600])
    result = run_cli("--stage", "1", "--data", str(root), "--out", str(tmp_path / "run"), "--max-steps", "2", *TINY)
    assert result.returncode == 0, result.stderr[-500:]
    assert "training without val_ figures" in result.stderr and "--val-data" in result.stderr
    assert "20 loads in a row" not in result.stderr
    lines = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert lines and not any("val_psnr" in line for line in lines)


def test_the_token_cache_holds_the_codes_every_other_encoding_gives(tokenizers, tmp_path):
    """One precision for all encodings of a run: the cache's codes of the first clips equal encode_clips'
    (validation, evaluation). On CUDA the cache was encoded under bf16 autocast; the suite run there checks it."""
    from kit.checkpoint import load_tokenizer
    from worlds.shapes import ShapesSource
    from kit.stream import encode_clips
    out = str(tmp_path / "gen")
    train.main(["--stage", "2", "--tokenizer-checkpoint", tokenizers[0], "--out", out, "--max-steps", "1", *TINY_GENERATOR])
    shard = os.path.join(out, "token_cache", sorted(os.listdir(os.path.join(out, "token_cache")))[0])
    cached = load_file(shard)["codes"].long()
    tokenizer, _ = load_tokenizer(tokenizers[0])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    codes, _, _ = encode_clips(tokenizer.to(device), ShapesSource(3, 32, 0), len(cached), device)
    assert torch.equal(cached, codes.cpu())
