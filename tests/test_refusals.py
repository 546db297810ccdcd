"""Nothing lost, round two: each fault of the second review (issue 30) as the command that met it. A bad
input is one line on stderr and exit 2, before any work; nothing a command did not make is overwritten
or removed; and a file of a few kilobytes cannot make a loader allocate without bound (items 4 to 6 run
in a child process under an address-space cap, their peak memory compared with a clean file's)."""

import dataclasses
import json
import os
import resource
import shutil
import struct
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import checkpoint
import sample
import train
from checkpoint import file_digest, generator_meta, save_checkpoint, shipped, tokenizer_meta
from config import TrainConfig
from data import make_source
from stream import content_digest
from maskgit import MaskGIT, MaskGITConfig
from runs import STATE
from stream import build_token_cache, cache_codes, load_token_cache
from tests.test_nothing_lost import caption_folder
from tests.test_own_videos import write_clip
from tests.test_train import ROOT, TINY, TINY_GENERATOR, run_cli
from text_encoder import CaptionTokenizer, TextEncoderConfig
from video import write_video
from vqgan import VQGAN, VQGANConfig

TOKENIZER = VQGANConfig(widths=(8, 16, 16), codebook_size=32, code_dim=4)
RECORD = {"data": "shapes", "frames": 3, "image_size": 32, "fps": 8.0}  # 4 x 4 codes, 2 latent frames


def one_line_exit_2(leave, capsys) -> str:
    """The message of a SystemExit that must be a refusal: exit code 2 and one line on stderr."""
    err = capsys.readouterr().err
    assert leave.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def tiny_tokenizer(path, **record) -> str:
    """A random tiny VQGAN file whose recorded train config is RECORD with `record`'s changes."""
    torch.manual_seed(0)
    meta = tokenizer_meta("vqgan", TOKENIZER, 5) | {"train_config": json.dumps(RECORD | record)}
    save_checkpoint(str(path), VQGAN(TOKENIZER).state_dict(), meta)
    return str(path)


def clip_file(path) -> str:
    write_video(str(path), torch.rand(3, 5, 32, 32) * 2 - 1, fps=8)
    return str(path)


# ----------------------------------------------------------------------------- work destroyed (items 1-3)

def test_reconstruct_refuses_samples_and_leaves_the_input_whole(tmp_path, capsys):
    mine = clip_file(tmp_path / "mine.mp4")
    before = file_digest(mine)
    with pytest.raises(SystemExit) as leave:
        sample.main(["--reconstruct", mine, "--out", mine, "--samples", "2"])
    assert "--samples is for generation" in one_line_exit_2(leave, capsys)
    assert file_digest(mine) == before and sorted(os.listdir(tmp_path)) == ["mine.mp4"]


def test_force_never_removes_the_tokenizer_that_the_run_reads(tmp_path, capsys):
    run = str(tmp_path / "run")
    train.main(["--stage", "1", "--out", run, "--max-steps", "2", *TINY])
    tokenizer = os.path.join(run, "model.safetensors")
    kept = {name: file_digest(os.path.join(run, name)) for name in os.listdir(run) if name.endswith("safetensors")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as leave:
        train.main(["--stage", "2", "--tokenizer-checkpoint", tokenizer, "--out", run, "--force", *TINY_GENERATOR])
    assert "writes or removes" in one_line_exit_2(leave, capsys)
    assert {name: file_digest(os.path.join(run, name)) for name in kept} == kept


@pytest.mark.parametrize("case", ["itself", "hard-link", "folder"])
def test_export_refuses_its_source_or_a_folder_and_keeps_both(tmp_path, capsys, case):
    src = tiny_tokenizer(tmp_path / "m.safetensors")
    digest = file_digest(src)
    os.makedirs(tmp_path / "shipped")
    (tmp_path / "shipped" / "generator.safetensors").write_bytes(b"the user's generator")
    dst = {"itself": src, "hard-link": str(tmp_path / "link.safetensors"), "folder": str(tmp_path / "shipped")}[case]
    if case == "hard-link":
        os.link(src, dst)
    for _ in range(2):  # twice, as the review ran it: the second run must not find an fp16 copy to keep
        with pytest.raises(SystemExit) as leave:
            checkpoint.main(["export", src, dst])
        one_line_exit_2(leave, capsys)
    assert file_digest(src) == digest and not os.path.exists(src + ".prev")
    assert os.listdir(tmp_path / "shipped") == ["generator.safetensors"] and not os.path.exists(f"{dst}.prev")


# ----------------------------------------------------------------------------- bounded memory (items 4-6)

CAP = 6 << 30  # the child's address space: an 8 GB read fails loudly, a bounded one fits


def capped(code: str) -> dict:
    """Run `code` in a child under CAP; it binds `result` (a dict), printed with the child's peak RSS."""
    script = ("import json, resource, sys\nsys.path.insert(0, %r)\nresult = {}\n" % ROOT + code
              + "\nresult['peak_kb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\nprint(json.dumps(result))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP)))
    assert done.returncode == 0, done.stderr[-1500:]
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"stderr": done.stderr}


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar makes the sparse member")
def test_a_sparse_8_gb_caption_in_a_tar_shard_is_read_only_as_far_as_it_is_kept(tmp_path):
    shards = {}
    for name, size in (("clean", 20), ("sparse", 8 << 30)):
        folder = tmp_path / name
        write_clip(str(folder / "k0.mp4"), "h264", 32, 32, 2)
        with open(folder / "k0.txt", "wb") as f:
            f.write(b"a dog running")
            f.truncate(size)  # beyond the text, a hole of zero bytes that takes no disk
        subprocess.run(["tar", "-S", "--format=gnu", "-cf", "shard-000.tar", "k0.mp4", "k0.txt"], cwd=folder,
                       check=True)
        assert os.path.getsize(folder / "shard-000.tar") < 1 << 20
        shards[name] = capped(f"from data import make_source\nsource = make_source({str(folder / 'shard-000.tar')!r}, "
                              "3, 32)\nresult['caption'] = source.items[0][1]")
    print({name: run["peak_kb"] for name, run in shards.items()})  # for the record (pytest -s)
    assert shards["sparse"]["caption"].startswith("a dog running") and len(shards["sparse"]["caption"]) <= 1000
    assert shards["sparse"]["peak_kb"] <= 1.5 * shards["clean"]["peak_kb"]


def avi(path, frames_claimed: int | None = None) -> str:
    """A 3-frame MJPEG AVI; frames_claimed rewrites the stream header's length (and the main header's count)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuvj420p"
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    if frames_claimed is not None:
        data = bytearray(open(path, "rb").read())
        strh, avih = data.index(b"strh"), data.index(b"avih")
        struct.pack_into("<I", data, strh + 8 + 32, frames_claimed)  # AVISTREAMHEADER.dwLength
        struct.pack_into("<I", data, avih + 8 + 16, frames_claimed)  # AVIMAINHEADER.dwTotalFrames
        open(path, "wb").write(data)
    return str(path)


def test_a_header_claiming_2_to_the_32_frames_reads_as_unknown_and_its_windows_stay_few(tmp_path):
    runs = {}
    for name, claimed in (("clean", None), ("claims", 2 ** 32 - 1)):
        folder = tmp_path / name
        os.makedirs(folder)
        avi(folder / "clip.avi", claimed)
        assert os.path.getsize(folder / "clip.avi") < 10_000
        runs[name] = capped(f"from data import make_source\nfrom video import video_seconds\n"
                            f"source = make_source({str(folder)!r}, 3, 32)\n"
                            f"result['seconds'] = video_seconds({str(folder / 'clip.avi')!r})\n"
                            "result['windows'] = len(source.windows(1000))")
    print({name: run["peak_kb"] for name, run in runs.items()})  # for the record (pytest -s)
    assert runs["claims"]["seconds"] == 0.0 and runs["clean"]["seconds"] > 0
    assert runs["claims"]["windows"] == 1
    assert runs["claims"]["peak_kb"] <= 1.5 * runs["clean"]["peak_kb"]


def test_windows_are_drawn_without_listing_them_and_as_before(tmp_path, monkeypatch):
    """Ten files of 1000 s: 20,000 windows, 50 drawn; the draw is the one the listed version made."""
    from data import CLIPS_PER_SECOND, VideoFolderSource
    folder = tmp_path / "clips"
    for i in range(10):
        write_clip(str(folder / f"c{i}.mp4"), "h264", 32, 32, 1, seed=i)
    source = VideoFolderSource(str(folder), 3, 32)
    monkeypatch.setattr(source, "seconds", lambda limit=None: [1000.0 + i for i in range(10)])
    spots = source.windows(50).spots
    listed = [(i, (1000.0 + i - 3 / 8) * (j + 0.5) / w) for i in range(10)
              for w in [int(np.ceil((1000.0 + i) * CLIPS_PER_SECOND))] for j in range(w)]
    keep = np.sort(np.random.default_rng([source.seed, 5]).choice(len(listed), 50, replace=False))
    assert spots == [listed[k] for k in keep]


@pytest.mark.parametrize("field,value,message", [("image_size", 4096, "image_size must lie in 8 to 512"),
                                                 ("fps", 0, "fps must lie in (0, 240]"),
                                                 ("image_size", 12, "multiple of 8"),
                                                 ("frames", 0, "frames must lie in 1 to 129")],
                         ids=["image_size=4096", "fps=0", "image_size=12", "frames=0"])
def test_a_tokenizer_recording_an_impossible_clip_is_refused_before_reconstruction(tmp_path, field, value,
                                                                                   message):
    clip = clip_file(tmp_path / "clip.mp4")
    runs = {}
    for name, record in (("clean", {}), ("crafted", {field: value})):
        tokenizer = tiny_tokenizer(tmp_path / f"{name}.safetensors", **record)
        out = str(tmp_path / f"{name}.png")
        runs[name] = capped(f"import sample\ntry:\n    sample.main(['--reconstruct', {clip!r}, '--out', {out!r}, "
                            f"'--tokenizer-checkpoint', {tokenizer!r}])\n    result['code'] = 0\n"
                            "except SystemExit as leave:\n    result['code'] = leave.code")
    print({name: run["peak_kb"] for name, run in runs.items()})  # for the record (pytest -s)
    assert runs["clean"]["code"] == 0 and os.path.exists(tmp_path / "clean.png")
    crafted = runs["crafted"]
    assert crafted["code"] == 2 and crafted["stderr"].count("\n") == 1 and message in crafted["stderr"]
    assert not os.path.exists(tmp_path / "crafted.png")
    assert crafted["peak_kb"] <= 1.5 * runs["clean"]["peak_kb"]


# ----------------------------------------------------------------------------- one line, not a traceback

def tiny_generator(path, tokenizer: str, **config) -> str:
    """A random generator of MaskGITConfig's fields `config`, paired with `tokenizer` by its sha256."""
    text = CaptionTokenizer.train(["a dog running", "a cat sitting"] * 4, vocab_size=300)
    fields = dict(codebook_size=32, latent_frames=2, grid=4, dim=32, depth=1, heads=2, mlp=64,
                  text=TextEncoderConfig(vocab_size=300, dim=32, depth=1, heads=2, mlp=64, max_len=16)) | config
    cfg = MaskGITConfig(**fields)
    frames = 1 + 2 * (cfg.latent_frames - 1)
    meta = generator_meta(cfg, 3, text, file_digest(tokenizer)) | {"train_config": json.dumps(RECORD | {"frames": frames})}
    save_checkpoint(str(path), MaskGIT(cfg).state_dict(), meta)
    return str(path)


def test_a_generator_whose_grid_is_not_its_tokenizers_is_refused_before_either_is_built(tmp_path, capsys):
    tokenizer = tiny_tokenizer(tmp_path / "tok.safetensors")
    tiny_generator(tmp_path / "good.safetensors", tokenizer)
    checkpoint.load_generator(str(tmp_path / "good.safetensors"), tokenizer)  # the pair as trained loads
    generator = tiny_generator(tmp_path / "gen.safetensors", tokenizer, grid=64, latent_frames=24)
    with pytest.raises(SystemExit) as leave:
        sample.main(["a dog running", "--checkpoint", generator, "--tokenizer-checkpoint", tokenizer,
                     "--out", str(tmp_path / "x.png")])
    assert "grid of 64 x 64 codes" in one_line_exit_2(leave, capsys)


def edit_meta(path: str, edit) -> str:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(path), path, metadata=edit(dict(meta)))
    return path


def test_export_of_a_step_that_is_no_number_is_one_line(tmp_path, capsys):
    src = edit_meta(tiny_tokenizer(tmp_path / "m.safetensors"), lambda meta: meta | {"step": "\u00b2"})
    with pytest.raises(SystemExit) as leave:
        checkpoint.main(["export", src, str(tmp_path / "half.safetensors")])
    assert "step must be a whole number" in one_line_exit_2(leave, capsys)


def test_an_alias_outside_the_book_is_refused_when_loaded(tmp_path, capsys):
    tokenizer = tiny_tokenizer(tmp_path / "tok.safetensors")
    tensors = load_file(tokenizer)
    tensors["quantizer.alias"][3] = 5000
    with safe_open(tokenizer, framework="pt") as f:
        save_file(tensors, tokenizer, metadata=f.metadata())
    with pytest.raises(SystemExit) as leave:
        sample.main(["--reconstruct", clip_file(tmp_path / "clip.mp4"), "--out", str(tmp_path / "r.png"),
                     "--tokenizer-checkpoint", tokenizer])
    assert "names codes outside the book of 32" in one_line_exit_2(leave, capsys)


def test_export_refuses_a_pairing_it_cannot_verify(tmp_path, capsys):
    generator = edit_meta(tiny_generator(tmp_path / "gen.safetensors", tiny_tokenizer(tmp_path / "tok.safetensors")),
                          lambda meta: {k: v for k, v in meta.items() if k != "tokenizer_sha256"})
    with pytest.raises(SystemExit) as leave:
        checkpoint.main(["export", generator, str(tmp_path / "half.safetensors"),
                         "--tokenizer", shipped("shapes", "tokenizer")])
    assert "cannot be checked" in one_line_exit_2(leave, capsys)
    assert not os.path.exists(tmp_path / "half.safetensors")


def test_a_stage_1_train_state_without_its_kind_is_refused_on_resume(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--stage", "1", "--out", out, "--max-steps", "2", *TINY])
    edit_meta(os.path.join(out, STATE), lambda meta: {k: v for k, v in meta.items() if k != "kind"})
    result = run_cli("--stage", "1", "--out", out, "--resume", "--max-steps", "3", "--device", "cpu")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "unknown tokenizer kind" in result.stderr and "Traceback" not in result.stderr


TRAIN_FAULTS = [
    (["--set", "train.save_every=0"], "save_every must lie in 1"),
    (["--set", "train.batch_size=0"], "batch_size must lie in 1"),
    (["--set", "train.frames=-1"], "frames must lie in 1"),
    (["--set", "train.image_size=12"], "multiple of 8"),
    (["--tokenizer", "cvivit", "--set", "model.heads=3"], "do not fit together"),
    (["--set", "model.widths=16,32,64,128"], "do not fit together"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--max-steps", "-5"], "--max-steps must be at least 1"),
    (["--device", "gpu"], "not a device"),
]


@pytest.mark.parametrize("flags,message", TRAIN_FAULTS, ids=["=".join(flags[-2:]) for flags, _ in TRAIN_FAULTS])
def test_train_refuses_values_out_of_range_before_any_work(tmp_path, capsys, flags, message):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as leave:
        train.main(["--stage", "1", "--out", out, "--device", "cpu", *flags])
    assert message in one_line_exit_2(leave, capsys)
    assert not os.path.exists(out) or not os.listdir(out)


def test_a_group_of_fields_set_as_one_value_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as leave:
        train.main(["--stage", "2", "--tokenizer-checkpoint", shipped("shapes", "tokenizer"), "--data", "shapes",
                    "--out", str(tmp_path / "run"), "--device", "cpu", "--set", "model.text=5"])
    assert "model.text is a group of fields" in one_line_exit_2(leave, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a build of torch without CUDA")
@pytest.mark.parametrize("device,message", [("cuda", "sees no CUDA GPU"), ("gpu", "not a device")], ids=["cuda", "gpu"])
def test_sample_refuses_a_device_it_cannot_use_before_any_work(tmp_path, capsys, device, message):
    with pytest.raises(SystemExit) as leave:
        sample.main(["a dog running", "--device", device, "--out", str(tmp_path / "x.mp4")])
    assert message in one_line_exit_2(leave, capsys)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["dir.gif", "dir.png"])
def test_sample_refuses_an_out_that_is_a_folder_before_any_work(tmp_path, capsys, name):
    os.makedirs(tmp_path / name)
    with pytest.raises(SystemExit) as leave:
        sample.main(["a dog running", "--out", str(tmp_path / name)])
    assert "is a folder" in one_line_exit_2(leave, capsys)
    assert os.listdir(tmp_path) == [name] and not os.listdir(tmp_path / name)


# ----------------------------------------------------------------------------- silently wrong data

def test_a_caption_that_never_closes_its_quote_keeps_the_rows_after_it(tmp_path, capsys):
    root = caption_folder(tmp_path / "clips", ["a dog", "a cat", "a bird", "a horse", "a fish"])
    lines = open(os.path.join(root, "captions.csv")).read().splitlines()
    lines[1] = 'c1.mp4,"a cat that never closes its quote'
    open(os.path.join(root, "captions.csv"), "w").write("\n".join(lines) + "\n")
    texts = dict((os.path.basename(str(path)), text) for path, text in make_source(root, 3, 32).items)
    assert len(texts) == 5 and texts["c2.mp4"] == "a bird" and texts["c4.mp4"] == "a fish"
    assert texts["c1.mp4"] == "a cat that never closes its quote"
    assert "line 2" in capsys.readouterr().err


def test_a_captions_csv_that_names_videos_elsewhere_is_a_video_folder(tmp_path):
    caption_folder(tmp_path / "other", ["a dog", "a cat", "a bird"])
    os.makedirs(tmp_path / "mine")
    (tmp_path / "mine" / "captions.csv").write_text("".join(f"../other/c{i}.mp4,clip {i}\n" for i in range(3)))
    source = make_source(str(tmp_path / "mine"), 3, 32)
    assert type(source).__name__ == "VideoFolderSource" and source.load(0)[0].shape[0] == 3


def test_videos_re_encoded_under_the_same_names_make_a_new_token_cache(tmp_path):
    torch.manual_seed(0)
    tokenizer = VQGAN(TOKENIZER).eval()
    cfg = TrainConfig(frames=3, image_size=32, cache_clips=4)

    def codes_of(root: str, out: str) -> torch.Tensor:
        config = dataclasses.replace(cfg, data=root)
        return cache_codes(out, tokenizer, "tok", config, make_source(root, 3, 32), 0, 1, torch.device("cpu"))[0]

    root = str(tmp_path / "clips")
    for i in range(4):
        write_clip(os.path.join(root, f"c{i}.mp4"), "h264", 32, 32, 1, seed=i)
    before = codes_of(root, str(tmp_path / "run"))
    digest = content_digest(make_source(root, 3, 32))
    for i in range(4):  # the same names and captions, other pictures
        write_clip(os.path.join(root, f"c{i}.mp4"), "h264", 32, 32, 1, seed=10 + i)
    assert content_digest(make_source(root, 3, 32)) != digest
    again = codes_of(root, str(tmp_path / "run"))
    fresh = codes_of(root, str(tmp_path / "fresh"))
    assert torch.equal(again, fresh) and not torch.equal(again, before)


def test_an_empty_token_cache_shard_is_built_again(tmp_path, capsys):
    folder = tmp_path / "token_cache"
    os.makedirs(folder)
    (folder / "tokens-000-of-001.safetensors").write_bytes(b"")
    source = make_source("shapes", 3, 32)
    build_token_cache(lambda video: torch.zeros(video.shape[0], 2, 4, 4), source, 4, str(folder), 2, 0, 1, "k")
    codes, captions, _ = load_token_cache(str(folder), 1, "k")
    assert codes.shape == (4, 2, 4, 4) and len(captions) == 4
    assert "not readable; building it again" in capsys.readouterr().err
