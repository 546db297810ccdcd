"""The path of a user with their own clips: a folder of real videos (written here with PyAV, two codecs,
two aspect ratios, captions.csv with its own header), stage 1 and stage 2 a few steps each, evaluate.py
on both, resume, and the refusals on the way."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest

from data import VideoFolderSource, held_out, make_source, train_and_val
from evals.watch import watch_list
from kit.config import TrainConfig
from test_train import ROOT, TINY, TINY_GENERATOR
from media.video import read_video

# (file, codec, width, height, seconds): h264 and mpeg4, 1:1 and 16:9
CLIPS = [("beach.mp4", "h264", 64, 64, 3), ("city/night.mp4", "h264", 96, 54, 2), ("dog.avi", "mpeg4", 64, 64, 3),
         ("forest.avi", "mpeg4", 96, 54, 2), ("rain.mp4", "h264", 64, 64, 2), ("snow.avi", "mpeg4", 96, 54, 3)]


def write_clip(path: str, codec: str, width: int, height: int, seconds: float, fps: int = 8, seed: int = 0) -> None:
    """A coloured square crossing a dark frame."""
    color = np.random.default_rng(seed).integers(80, 256, 3)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(int(seconds * fps)):
            img = np.full((height, width, 3), 20, np.uint8)
            x = 2 * t % (width - 16)
            img[height // 2 - 8:height // 2 + 8, x:x + 16] = color
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def captions_of(name: str) -> str:
    return f"a square crossing the {os.path.splitext(os.path.basename(name))[0]}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("clips")
    for i, (name, codec, w, h, seconds) in enumerate(CLIPS):
        write_clip(str(root / name), codec, w, h, seconds, seed=i)
    with open(root / "Captions.csv", "w", newline="") as f:  # capitalised, with a header of its own words
        csv.writer(f).writerows([("file", "text")] + [(name, captions_of(name)) for name, *_ in CLIPS])
    return str(root)


def run(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def records(out: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_held_out_files_are_chosen_by_name_and_never_trained_on(folder):
    names = [name for name, *_ in CLIPS]
    train, val = (VideoFolderSource(folder, 3, 32, split=s) for s in ("train", "val"))
    trained = {os.path.relpath(p, folder) for p, _ in train.items}
    kept = {os.path.relpath(p, folder) for p, _ in val.items}
    assert kept and trained and not kept & trained and kept | trained == set(names)
    assert kept == {n for n, h in zip(names, held_out(names)) if h}  # by name: the same wherever it runs
    assert held_out(names[::-1]) == held_out(names)[::-1]  # and whatever the order of the listing
    assert sum(held_out([f"clip{i:04d}.mp4" for i in range(2000)])) in range(150, 250)  # about VAL_SHARE


def test_the_token_cache_takes_windows_in_proportion_to_each_file(folder):
    windows = make_source(folder, 3, 32).windows(10_000)
    per_file = np.bincount([i for i, _ in windows.spots])
    seconds = windows.files.seconds()
    assert list(per_file) == [int(np.ceil(2 * s)) for s in seconds]  # CLIPS_PER_SECOND = 2
    starts = sorted(start for i, start in windows.spots if i == 0)
    assert starts[0] < 0.5 and starts[-1] > seconds[0] - 1.0  # spread over the whole file
    assert len(make_source(folder, 3, 32).windows(5)) == 5  # capped


def test_pad_keeps_the_whole_frame_letterboxed(folder):
    centre = read_video(os.path.join(folder, "forest.avi"), 1, 32)[0]
    padded = read_video(os.path.join(folder, "forest.avi"), 1, 32, crop="pad")[0]
    assert centre.shape == padded.shape == (32, 32, 3)
    assert padded[:6].max() == 0 and padded[-6:].max() == 0  # 96 x 54 -> 32 x 18: black bars above and below
    assert centre[:6].min() > 0  # the centre crop fills the square


def test_your_own_videos_from_folder_to_samples_of_your_captions(folder, tmp_path):
    s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    kept = [n for (n, *_), h in zip(CLIPS, held_out([n for n, *_ in CLIPS])) if h]
    # stage 1: the summary line, then val_psnr and val_ssim on the held-out files
    result = run("train.py", "--stage", "1", "--data", folder, "--out", s1, "--max-steps", "2", *TINY,
                 "--set", "train.image_every=2")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = re.search(r"data .*: (\d+) videos for train \(Captions.csv: (\d+) captioned, 0 empty\), "
                        r"(\d+) held out for validation by name hash \((.*)\), (\d+) s of video", result.stdout)
    assert summary, result.stdout
    assert summary.groups()[:3] == (str(len(CLIPS) - len(kept)),) * 2 + (str(len(kept)),)
    assert summary[4] == ", ".join(sorted(kept))
    assert abs(int(summary[5]) - sum(c[4] for c, h in zip(CLIPS, held_out([n for n, *_ in CLIPS])) if not h)) <= 1
    assert {"val_psnr", "val_ssim"} <= records(s1)[-1].keys()
    tokenizer = os.path.join(s1, "model.safetensors")

    # stage 2 without --data would train on Shapes behind this tokenizer: refused, one line
    result = run("train.py", "--stage", "2", "--tokenizer-checkpoint", tokenizer, "--out", s2, *TINY_GENERATOR)
    assert result.returncode == 2 and "the tokenizer was trained on --data" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # stage 2: a held-out loss, and a watch grid of the held-out captions
    result = run("train.py", "--stage", "2", "--tokenizer-checkpoint", tokenizer, "--data", folder, "--out", s2,
                 "--max-steps", "2", *TINY_GENERATOR)
    assert result.returncode == 0, result.stderr[-2000:]
    watched = re.search(r"samples.png shows: (.*)", result.stdout)[1].split(" | ")
    assert sorted(watched) == sorted(captions_of(n) for n in kept)
    assert "val_loss" in records(s2)[-1] and os.path.getsize(os.path.join(s2, "samples.png")) > 0

    # evaluate.py: both stages measured on the held-out files by default, or on --data
    result = run("evaluate.py", tokenizer, "--clips", "4")
    assert result.returncode == 0 and re.search(r"^psnr: \d", result.stdout, re.M), result.stderr[-2000:]
    result = run("evaluate.py", os.path.join(s2, "model.safetensors"), "--tokenizer-checkpoint", tokenizer,
                 "--clips", "4", "--steps", "2", "--data", folder, "--grid", str(tmp_path / "grid.png"))
    assert result.returncode == 0 and re.search(r"^val_loss: \d", result.stdout, re.M), result.stderr[-2000:]
    assert os.path.getsize(tmp_path / "grid.png") > 0

    # resume: the saved config (the folder, the sizes) comes back without repeating a flag
    result = run("train.py", "--stage", "2", "--out", s2, "--resume", "--max-steps", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"data {folder}: " in result.stdout and [r["step"] for r in records(s2)] == [1, 2, 3]


def test_stage2_refuses_data_whose_captions_are_all_empty(folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("beach.mp4", "dog.avi"):
        shutil.copy(os.path.join(folder, name), bare / name)
    result = run("train.py", "--stage", "2", "--tokenizer-checkpoint", os.path.join(ROOT, "checkpoints", "shapes",
                 "tokenizer.safetensors"), "--data", str(bare), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.returncode == 2 and result.stderr.startswith(f"error: every caption of {bare} is empty")
    assert len(result.stderr.strip().splitlines()) == 1


def test_val_data_names_the_held_out_set_and_every_training_file_is_trained_on(folder, tmp_path):
    other = tmp_path / "held"
    other.mkdir()
    for name in ("beach.mp4", "dog.avi"):
        shutil.copy(os.path.join(folder, name), other / name)
    cfg = TrainConfig(data=folder, val_data=str(other), frames=3, image_size=32)
    source, val, summary = train_and_val(cfg, stage=1)
    assert len(source) == len(CLIPS)  # nothing of --data is held back
    assert sorted(os.path.basename(p) for p, _ in val.items) == ["beach.mp4", "dog.avi"]
    assert summary[1].startswith(f"data {other}: 2 videos for validation")


def test_watch_prompts_are_the_lines_of_a_file_and_stage_2_only(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog on a beach\n\n  a cat at night \n")
    assert watch_list(str(tmp_path), ["a held-out caption"], str(prompts)).prompts == ["a dog on a beach", "a cat at night"]
    for stage, path, message in (("1", prompts, "stage 2 only"), ("2", tmp_path / "none.txt", "no such file")):
        result = run("train.py", "--stage", stage, "--watch-prompts", str(path), "--out", str(tmp_path / "o"),
                     "--tokenizer-checkpoint", os.path.join(ROOT, "checkpoints", "shapes", "tokenizer.safetensors"))
        assert result.returncode == 2 and result.stderr.strip() == f"error: --watch-prompts {path}: {message}"
