"""Nothing lost, round two: each fault of the second review (issue 30) as the command that met it. A bad
input is one line on stderr and exit 2, before any work; nothing a command did not make is overwritten
or removed; and a file of a few kilobytes cannot make a loader allocate without bound (items 4 to 6 run
in a child process under an address-space cap, their peak memory compared with a clean file's)."""

import dataclasses
import importlib.util
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

import sample
import train
from data import make_source
from kit import checkpoint
from kit.checkpoint import file_digest, generator_meta, save_checkpoint, shipped, tokenizer_meta
from kit.config import TrainConfig
from kit.runs import STATE
from kit.stream import build_token_cache, cache_codes, content_digest, load_token_cache
from media.video import write_video
from maskgit import MaskGIT, MaskGITConfig
from tests.test_nothing_lost import caption_folder
from tests.test_own_videos import write_clip
from tests.test_train import ROOT, TINY, TINY_GENERATOR, run_cli
from text_encoder import CaptionTokenizer, TextEncoderConfig
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
        runs[name] = capped(f"from data import make_source\nfrom media.video import video_seconds\n"
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
    # round three: every number of the train config in its range (row 14), the files setup reads (row 16)
    (["--set", "train.lr=-1"], "lr must lie in 0 to 10, not -1"),
    (["--set", "train.seed=-1"], "seed must lie in 0 to"),
    (["--set", "train.grad_clip=-1"], "grad_clip must be above 0"),
    (["--set", "train.ema=3"], "ema must lie in 0 to 0.999999"),
    (["--set", "train.fold_cosine=-1"], "fold_cosine must lie in 0 to 1"),
    (["--set", "train.weight_decay=-1"], "weight_decay must lie in 0 to 10"),
    (["--set", "train.beta2=1"], "beta2 must lie in 0 to 0.999999"),
    (["--perceptual-weights", "missing.safetensors"], "missing.safetensors: no such file"),
]


@pytest.mark.parametrize("flags,message", TRAIN_FAULTS, ids=["=".join(flags[-2:]) for flags, _ in TRAIN_FAULTS])
def test_train_refuses_values_out_of_range_before_any_work(tmp_path, capsys, flags, message):
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as leave:
        # one step, should a value pass that must not
        train.main(["--stage", "1", "--out", out, "--device", "cpu", "--max-steps", "1", *flags])
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


# ----------------------------------------------------------------------------- round three (issue 46)
# Each test names its row of the table.

import evaluate  # noqa: E402
from kit import fold  # noqa: E402
from kit import stream  # noqa: E402
from media import video  # noqa: E402
from kit.checkpoint import TRAIN_LIMITS, check_pairing  # noqa: E402
from kit.config import frame_shares, tokenizer_preset  # noqa: E402
from media.folders import folder_items  # noqa: E402
from media.video import VIDEO_EXTS, read_video  # noqa: E402


def no_work(monkeypatch, module, *names):
    """Make each of `module`'s `names` fail the test if it is called: the command must refuse before it."""
    def work(*args, **kwargs):
        raise AssertionError("the work began before the refusal")
    for name in names:
        monkeypatch.setattr(module, name, work)


@pytest.mark.parametrize("where", ["the tokenizer", "no folder"])
def test_1_15_evaluate_refuses_a_json_over_its_input_or_in_no_folder_before_any_work(tmp_path, capsys, monkeypatch,
                                                                                      where):
    tokenizer = tiny_tokenizer(tmp_path / "tok.safetensors")
    before = file_digest(tokenizer)
    json_path = tokenizer if where == "the tokenizer" else str(tmp_path / "no" / "such" / "x.json")
    no_work(monkeypatch, evaluate, "load_tokenizer", "load_generator")
    with pytest.raises(SystemExit) as leave:
        evaluate.main([tokenizer, "--clips", "2", "--json", json_path])
    assert ("is the input" if where == "the tokenizer" else "there is no folder") in one_line_exit_2(leave, capsys)
    assert file_digest(tokenizer) == before


def test_2_an_input_named_as_a_side_file_of_the_output_is_refused_and_kept(tmp_path, capsys):
    part = str(tmp_path / "clip.mp4.part")  # a video kept under that name
    os.rename(clip_file(tmp_path / "kept.mp4"), part)
    before = file_digest(part)
    with pytest.raises(SystemExit) as leave:
        sample.main(["a dog running", "--init", part, "--out", str(tmp_path / "clip.mp4")])
    assert "clip.mp4.part, which is the input" in one_line_exit_2(leave, capsys)
    assert file_digest(part) == before
    # export writes dst.tmp and keeps the dst it replaces as dst.prev: a source named dst.prev would be lost
    dst = tiny_tokenizer(tmp_path / "tok.safetensors")
    src = tiny_tokenizer(tmp_path / "tok.safetensors.prev")
    kept = {path: file_digest(path) for path in (src, dst)}
    with pytest.raises(SystemExit) as leave:
        checkpoint.main(["export", src, dst])
    assert "tok.safetensors.prev, which is the input" in one_line_exit_2(leave, capsys)
    assert {path: file_digest(path) for path in (src, dst)} == kept


def test_24_fold_refuses_a_destination_in_no_folder_before_counting(tmp_path, capsys, monkeypatch):
    tokenizer = tiny_tokenizer(tmp_path / "tok.safetensors")
    no_work(monkeypatch, fold, "load_tokenizer", "make_source")
    with pytest.raises(SystemExit) as leave:
        fold.main([tokenizer, str(tmp_path / "no" / "such" / "f.safetensors"), "--cosine", "0.9"])
    assert "there is no folder" in one_line_exit_2(leave, capsys)


def test_4_default_names_never_replace_another_prompts_video(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made = []

    def fake_generate(args):  # writes what the real one would, where it would
        made.append(args.out)
        with open(args.out, "w") as f:
            f.write(" ".join(args.prompts))
    monkeypatch.setattr(sample, "run_generate", fake_generate)
    for prompt in ("красный круг", "синий квадрат", "красный круг", "a" * 60 + " one", "a" * 60 + " two"):
        sample.main([prompt])
    assert len(set(made)) == 5 and all(os.path.isfile(path) for path in made)
    assert made[0] == os.path.join("samples", "красный-круг.mp4")
    assert open(made[1]).read() == "синий квадрат" and open(made[0]).read() == "красный круг"


SAMPLE_FAULTS = [  # rows 7, 21, 23: refused before the models are loaded
    (["--frames", "10000000001"], "--frames must lie in 1 to 10000"),
    (["--cfg", "1e39"], "--cfg must lie in 0 to 1000"),
    (["--temperature", "nan"], "--temperature must lie in 0 to 1000"),
    (["--seed", str(2 ** 70)], "--seed must lie in 0 to 2^63 - 1"),
    (["--steps", "0"], "--steps must lie in 1 to 1000"),
]


@pytest.mark.parametrize("flags,message", SAMPLE_FAULTS, ids=[" ".join(flags) for flags, _ in SAMPLE_FAULTS])
def test_7_21_23_sample_refuses_flags_out_of_range_before_any_work(tmp_path, capsys, monkeypatch, flags, message):
    no_work(monkeypatch, sample, "load_generator", "load_tokenizer")
    with pytest.raises(SystemExit) as leave:
        sample.main(["a dog running", "--out", str(tmp_path / "x.mp4"), *flags])
    assert message in one_line_exit_2(leave, capsys)


EVALUATE_FAULTS = [  # rows 15, 23
    (["--clips", "0"], "--clips must be at least 1"),
    (["--prompts", "0", "--stories", "0"], "--prompts must be at least 1"),
    (["--stories", "-1"], "--stories must be at least 0"),
    (["--seed", str(2 ** 70)], "--seed must lie in 0"),
]


@pytest.mark.parametrize("flags,message", EVALUATE_FAULTS, ids=[" ".join(flags) for flags, _ in EVALUATE_FAULTS])
def test_15_23_evaluate_refuses_flags_out_of_range_before_any_work(capsys, monkeypatch, flags, message):
    no_work(monkeypatch, evaluate, "read_header", "load_generator", "load_tokenizer")
    with pytest.raises(SystemExit) as leave:
        evaluate.main(["--world", "shapes", *flags])
    assert message in one_line_exit_2(leave, capsys)


def test_22_reconstruct_reads_only_the_frames_it_is_asked_for(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(video, "MAX_FRAMES", 20)  # a video longer than a whole read may be
    long_clip = str(tmp_path / "long.mp4")
    write_video(long_clip, torch.rand(3, 30, 32, 32) * 2 - 1, fps=8)
    tokenizer = tiny_tokenizer(tmp_path / "tok.safetensors")
    sample.main(["--reconstruct", long_clip, "--frames", "11", "--tokenizer-checkpoint", tokenizer,
                 "--out", str(tmp_path / "recon.mp4")])
    assert "frames: 11" in capsys.readouterr().out
    assert read_video(str(tmp_path / "recon.mp4")).shape[0] == 11


def test_9_a_small_gif_on_a_huge_canvas_is_refused_by_what_its_bytes_can_hold(tmp_path):
    gif = str(tmp_path / "crafted.gif")
    write_video(gif, np.zeros((120, 1024, 1024, 3), np.uint8), fps=8)  # a few KB: each frame repeats the last
    honest = str(tmp_path / "honest.mp4")
    write_video(honest, np.random.default_rng(0).integers(0, 255, (30, 64, 64, 3), dtype=np.uint8), fps=8)
    assert os.path.getsize(gif) < 20_000
    budget = video.DECODE_FLOOR + video.DECODE_PER_BYTE * os.path.getsize(gif)
    assert 120 * 1024 ** 2 > budget - video.DECODE_FLOOR  # more pixels than its bytes honestly hold
    old_floor = video.DECODE_FLOOR
    try:
        video.DECODE_FLOOR = 0  # what is left of the budget is the bytes' share
        with pytest.raises(ValueError, match="more pixels than a file of its size honestly holds"):
            read_video(gif, size=64, fps=8)
        assert read_video(honest, size=64).shape == (30, 64, 64, 3)  # a noisy video of honest size reads
    finally:
        video.DECODE_FLOOR = old_floor


@pytest.mark.parametrize("command", ["train", "fold"])
def test_5_a_brace_pattern_of_10_to_the_11_names_is_one_line(tmp_path, capsys, command):
    pattern = str(tmp_path / "x-{0..99999999999}.tar")
    with pytest.raises(SystemExit) as leave:
        if command == "train":
            train.main(["--stage", "1", "--data", pattern, "--out", str(tmp_path / "run"), *TINY])
        else:
            fold.main([tiny_tokenizer(tmp_path / "tok.safetensors", data=pattern), str(tmp_path / "f.safetensors"),
                       "--cosine", "0.9"])
    assert "names more than 1000000 files" in one_line_exit_2(leave, capsys)


def test_6_a_tokenizer_recording_a_batch_too_large_together_is_refused_before_counting(tmp_path, capsys, monkeypatch):
    tokenizer = tiny_tokenizer(tmp_path / "tok.safetensors", batch_size=4096, frames=129, image_size=512)
    no_work(monkeypatch, fold, "make_source")
    with pytest.raises(SystemExit) as leave:
        fold.main([tokenizer, str(tmp_path / "f.safetensors"), "--cosine", "0.9"])
    assert "holds 1.39e+11 pixels" in one_line_exit_2(leave, capsys)


def test_10_every_c_vivit_preset_reads_its_own_clips_and_a_mismatch_is_one_line(tmp_path, capsys):
    for preset in ("tiny", "base", "paper"):
        model, cfg = tokenizer_preset(preset, "cvivit")
        check_pairing("cvivit", model, cfg, preset)
        assert model.image_size == cfg.image_size, preset
    with pytest.raises(SystemExit) as leave:
        train.main(["--stage", "1", "--tokenizer", "cvivit", "--set", "model.image_size=128",
                    "--out", str(tmp_path / "run"), "--device", "cpu", "--max-steps", "1"])
    assert "set model.image_size=64" in one_line_exit_2(leave, capsys)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("flag,message", [("model.text.vocab_size=64", "below the caption BPE's 258 tokens"),
                                          ("train.frames=1", "a window of one latent frame cannot shift"),
                                          ("train.lr=-1", "lr must lie in 0 to 10")])
def test_8_11_14_stage_2_refuses_a_config_it_cannot_train_before_the_token_cache(tmp_path, capsys, monkeypatch,
                                                                                 flag, message):
    tokenizer = tiny_tokenizer(tmp_path / "tok.safetensors", frames=1 if flag == "train.frames=1" else 3)
    no_work(monkeypatch, train, "cache_codes")
    with pytest.raises(SystemExit) as leave:
        train.main(["--stage", "2", "--tokenizer-checkpoint", tokenizer, "--data", "shapes",
                    "--out", str(tmp_path / "run"), *TINY_GENERATOR, "--set", flag])
    assert message in one_line_exit_2(leave, capsys)


def test_8_a_generator_of_one_latent_frame_is_refused_before_it_plans_windows(tmp_path, capsys):
    tokenizer = tiny_tokenizer(tmp_path / "tok.safetensors", frames=1)
    generator = tiny_generator(tmp_path / "gen.safetensors", tokenizer, latent_frames=1)
    with pytest.raises(SystemExit) as leave:
        sample.main(["a dog running", "--frames", "3", "--checkpoint", generator, "--tokenizer-checkpoint",
                     tokenizer, "--out", str(tmp_path / "x.mp4")])
    assert "one latent frame cannot shift" in one_line_exit_2(leave, capsys)


def test_12_a_caption_bpe_that_numbers_a_token_past_the_table_is_one_line(tmp_path, capsys):
    tokenizer = tiny_tokenizer(tmp_path / "tok.safetensors")

    def past_the_table(meta):
        fields = json.loads(meta["text_tokenizer"])
        bpe = json.loads(fields["bpe"])
        bpe["model"]["vocab"]["Ġsitting"] = 5000  # the count of tokens stays 277, of a table of 300
        return meta | {"text_tokenizer": json.dumps(fields | {"bpe": json.dumps(bpe)})}
    generator = edit_meta(tiny_generator(tmp_path / "gen.safetensors", tokenizer), past_the_table)
    with pytest.raises(SystemExit) as leave:
        sample.main(["a cat sitting", "--checkpoint", generator, "--tokenizer-checkpoint", tokenizer,
                     "--out", str(tmp_path / "x.mp4")])
    assert "numbers a token 5000, past the text encoder's 300" in one_line_exit_2(leave, capsys)


def test_14_every_number_of_the_train_config_has_a_range():
    numbers = [f.name for f in dataclasses.fields(TrainConfig) if f.type in (int, float, "int", "float")]
    assert sorted(set(numbers) - {"fps"}) == sorted(TRAIN_LIMITS)


def test_17_an_undecodable_label_folder_name_becomes_u_fffd_and_trains_the_bpe(tmp_path):
    root = tmp_path / "videos"
    label = os.path.join(os.fsencode(str(root)), b"caf\xe9")
    os.makedirs(label)
    write_video(os.path.join(os.fsdecode(label), "a.mp4"), torch.rand(3, 3, 16, 16) * 2 - 1, fps=8)
    (_, caption), = folder_items(root, VIDEO_EXTS)[0]
    assert caption == "a video of caf\ufffd"
    text = CaptionTokenizer.train([caption] * 4, vocab_size=300)
    assert text.encode([caption], 16)[1].sum() > 1


def test_18_ctrl_c_while_the_token_cache_is_built_is_one_line_and_130(tmp_path, capsys, monkeypatch):
    tokenizer = tiny_tokenizer(tmp_path / "tok.safetensors")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(stream, "build_token_cache", interrupted)
    try:
        with pytest.raises(SystemExit) as leave:
            train.main(["--stage", "2", "--tokenizer-checkpoint", tokenizer, "--data", "shapes",
                        "--out", str(tmp_path / "run"), *TINY_GENERATOR])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left as a traceback")
    err = capsys.readouterr().err
    assert leave.value.code == 130 and "stopped by Ctrl-C" in err and "Traceback" not in err


def test_19_a_full_disk_under_the_token_cache_is_one_line_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    tokenizer = tiny_tokenizer(tmp_path / "tok.safetensors")

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(stream, "save_file", full_disk)
    with pytest.raises(SystemExit) as leave:
        train.main(["--stage", "2", "--tokenizer-checkpoint", tokenizer, "--data", "shapes",
                    "--out", str(tmp_path / "run"), *TINY_GENERATOR])
    err = capsys.readouterr().err
    assert leave.value.code == 1 and err.count("\n") == 1 and "could not write the token cache" in err
    assert not [name for name in os.listdir(tmp_path / "run" / "token_cache") if name.endswith(".tmp")]


def test_19_a_full_disk_under_a_sample_is_one_line_and_keeps_the_video_before(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "x.mp4")
    with open(out, "wb") as f:
        f.write(b"an earlier video")

    def full_disk(self, video):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(video.VideoWriter, "write", full_disk)
    with pytest.raises(SystemExit) as leave:
        sample.main(["a dog running", "--steps", "1", "--out", out])
    err = capsys.readouterr().err
    assert leave.value.code == 1 and err.count("\n") == 1 and "No space left on device" in err
    assert open(out, "rb").read() == b"an earlier video" and os.listdir(tmp_path) == ["x.mp4"]


def test_3_a_second_run_in_a_folder_another_run_writes_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from kit import runs; runs.lock_run(sys.argv[1]); print('held', "
                               "flush=True); sys.stdin.read()", out], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as leave:
            train.main(["--stage", "1", "--out", out, "--max-steps", "1", *TINY])
        assert "is in use by another train.py" in one_line_exit_2(leave, capsys)
        assert sorted(os.listdir(out)) == ["run.lock"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    train.main(["--stage", "1", "--out", out, "--max-steps", "1", *TINY])  # the lock went with its process


def test_13_a_torn_last_log_line_is_skipped_on_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(["--stage", "1", "--out", out, "--max-steps", "1", *TINY, "--set", "train.save_every=1"])
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write('{"step": 2, "lo')  # killed mid-write
    train.main(["--stage", "1", "--out", out, "--resume", "--max-steps", "2", "--device", "cpu"])
    with open(os.path.join(out, "log.jsonl")) as f:
        lines = f.read().splitlines()
    assert [json.loads(line)["step"] for line in lines if line.endswith("}")] == [1, 2]


@pytest.mark.parametrize("script", ["motion-sampler.py", "decoding-study.py"])
def test_20_the_sampler_studies_refuse_a_missing_generator_in_one_line(script, capsys, monkeypatch):
    """The studies in docs/ load a generator the way sample.py does, and refuse the same way."""
    path = os.path.join(ROOT, "docs", script)
    spec = importlib.util.spec_from_file_location(script[:-3].replace("-", "_"), path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    monkeypatch.setattr(sys, "argv", [script, "prompts" if script == "motion-sampler.py" else "directed",
                                      "--generator", "no/such/generator.safetensors"])
    with pytest.raises(SystemExit) as leave:
        study.main()
    assert "no/such/generator.safetensors" in one_line_exit_2(leave, capsys)


def test_an_init_that_fills_the_video_asked_for_says_it_holds_at_least_that_many():
    """--init is read no further than --frames (row 22), so a longer one is not said to be shorter."""
    with pytest.raises(sample.UsageError, match="at least the 11 frames asked"):
        frame_shares(11, 1, 11)
    assert frame_shares(21, 2, 1) == [10, 10]
