"""What real machines do to a training run, and what users type: each fault is made to happen."""
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train
from kit.checkpoint import DEFAULT_WORLD, load_checkpoint, shipped
from test_train import ROOT, TINY

TRAIN = [sys.executable, os.path.join(ROOT, "train.py"), "--stage", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # the same thread count in every run: the same floating-point sums


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300, **kwargs)


def assert_same_state(a_dir: str, b_dir: str) -> None:
    a, b = (load_file(os.path.join(d, "train_state.safetensors")) for d in (a_dir, b_dir))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@contextlib.contextmanager
def launched(cmd: list[str]):
    """A run in its own process group, killed with it however the test ends."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        # DataLoader workers leave the group (faults.quiet_worker): one that hangs keeps the pipes
        # open after the run is gone, and the test fails instead of waiting on it forever
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=60)


def wait_for(ready, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until ready() (or, given a path, until it exists), failing if the run ends or time runs out first."""
    check = (lambda: os.path.exists(ready)) if isinstance(ready, str) else ready
    deadline = time.time() + seconds
    while not check():
        assert proc.poll() is None, proc.communicate(timeout=60)[1][-2000:]
        assert time.time() < deadline, "the run never got there"
        time.sleep(0.02)


def logged_steps(out: str) -> list[int]:
    return [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))]


# ----------------------------------------------------------------------------- killed, stopped, diverged, disk full

def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    args = ["--max-steps", "90", *TINY]
    assert run(TRAIN + ["--out", whole, *args]).returncode == 0
    rng = np.random.default_rng(0)
    state = os.path.join(killed, "train_state.safetensors")
    for _ in range(3):  # three kills at random moments while training, each resumed
        logged = len(logged_steps(killed)) if os.path.exists(state) else 0
        resume = ["--resume"] if os.path.exists(state) else []  # nothing to resume before the first checkpoint
        with launched(TRAIN + ["--out", killed, *resume, *args]) as proc:
            wait_for(lambda: os.path.exists(state) and len(logged_steps(killed)) > logged, proc)  # stepping
            time.sleep(rng.uniform(0, 0.3))
            proc.kill()
            assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
        load_checkpoint(state)  # whole after every kill: never a torn file
    result = run(TRAIN + ["--out", killed, "--resume", *args])
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_state(whole, killed)


def test_sigterm_saves_a_checkpoint_before_it_exits(tmp_path):
    out = str(tmp_path / "term")
    # as a scheduler does, the signal goes to the whole process group: the run and its DataLoader worker
    with launched(TRAIN + ["--out", out, "--max-steps", "100000", *TINY, "--set", "train.save_every=100000",
                           "--set", "train.workers=1"]) as proc:
        wait_for(lambda: os.path.exists(os.path.join(out, "log.jsonl")) and len(logged_steps(out)) >= 3, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by a signal" in stdout
    _, meta = load_checkpoint(os.path.join(out, "train_state.safetensors"))
    assert int(meta["step"]) == logged_steps(out)[-1] >= 3  # the step it stopped at, not an earlier one


def test_sigterm_while_sampling_removes_the_part_file_and_keeps_the_video_before(tmp_path):
    """Issue 46, row 25: SIGTERM unwinds sample.py as Ctrl-C does, through the writer that removes its part."""
    sig = signal.SIGTERM
    out = str(tmp_path / "x.mp4")
    with open(out, "wb") as f:
        f.write(b"an earlier video")
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "a dog running", "--frames", "10000", "--steps", "1",
           "--out", out]
    with launched(cmd) as proc:
        wait_for(out + ".part", proc)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig and "Traceback" not in stderr, stderr[-1000:]
    assert os.listdir(tmp_path) == ["x.mp4"] and open(out, "rb").read() == b"an earlier video"


def nan_on_steps(monkeypatch, steps: set[int] | None) -> None:
    """Make stage 1's reconstruction loss NaN at these steps, counted from 1 (None: at every step)."""
    mse, count = train.F.mse_loss, [0]

    def patched(x, *args, **kwargs):
        loss = mse(x, *args, **kwargs)
        if x.dim() != 5:  # the quantizer's own losses
            return loss
        count[0] += 1
        return loss * float("nan") if steps is None or count[0] in steps else loss
    monkeypatch.setattr(train.F, "mse_loss", patched)


def inf_gradient_on_step(monkeypatch, step: int) -> None:
    """A finite loss whose gradient norm is infinite at this step, counted from 1."""
    clip, count = torch.nn.utils.clip_grad_norm_, [0]

    def patched(*args, **kwargs):
        count[0] += 1
        norm = clip(*args, **kwargs)
        return norm * float("inf") if count[0] == step else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", patched)


@pytest.mark.parametrize("fault", ["loss", "gradient"])
def test_a_non_finite_step_skips_that_update_and_the_run_goes_on(tmp_path, monkeypatch, fault):
    clean, spiked = str(tmp_path / "clean"), str(tmp_path / "spiked")
    train.main(["--stage", "1", "--out", clean, "--max-steps", "3", *TINY, "--set", "train.restart_every=100"])
    nan_on_steps(monkeypatch, {3}) if fault == "loss" else inf_gradient_on_step(monkeypatch, 3)
    train.main(["--stage", "1", "--out", spiked, "--max-steps", "3", *TINY, "--set", "train.restart_every=100"])
    record = [json.loads(line) for line in open(os.path.join(spiked, "log.jsonl"))][-1]
    assert record["step"] == 3 and record["skipped_steps"] == 1
    a, b = (load_file(os.path.join(d, "train_state.safetensors")) for d in (clean, spiked))
    weights = [k for k in a if k.startswith("model.") and k.endswith("weight")]
    assert all(torch.isfinite(b[k]).all() for k in b)
    assert any(not torch.equal(a[k], b[k]) for k in weights)  # step 3's update was left out


def test_repeated_non_finite_losses_stop_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    nan_on_steps(monkeypatch, None)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--stage", "1", "--out", str(tmp_path / "nan"), "--max-steps", "50", *TINY])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "not finite 10 steps in a row" in err and len(err.strip().splitlines()) == 1


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    out = str(tmp_path / "full")
    assert run(TRAIN + ["--out", out, "--max-steps", "2", *TINY]).returncode == 0
    state = os.path.join(out, "train_state.safetensors")
    before = open(state, "rb").read()
    limit = os.path.getsize(os.path.join(out, "model.safetensors")) // 2

    def small_disk() -> None:  # every file this process writes stops growing at `limit` bytes, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run(TRAIN + ["--out", out, "--max-steps", "6", "--resume", *TINY], preexec_fn=small_disk)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint at step 4 not saved" in result.stderr and "Traceback" not in result.stderr
    assert "checkpoint at step 6 not saved" in result.stderr  # the run went on past the failed save
    assert open(state, "rb").read() == before  # the step-2 state, byte for byte
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_a_missing_train_state_falls_back_to_the_previous_one(tmp_path, capsys):
    out = str(tmp_path / "prev")
    train.main(["--stage", "1", "--out", out, "--max-steps", "4", *TINY])  # saves at 2 and 4; 2 is kept as .prev
    state = os.path.join(out, "train_state.safetensors")
    open(state, "wb").write(b"torn")  # as if the newest were lost
    train.main(["--stage", "1", "--out", out, "--max-steps", "6", "--resume", *TINY])
    assert f"resumed from {state}.prev at step 2" in capsys.readouterr().out


def torchrun_workers(parent: int) -> list[int]:
    """The train.py processes torchrun has started (Linux /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmdline = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and "train.py" in cmdline:
            pids.append(int(pid))
    return pids


def test_a_killed_torchrun_worker_is_restarted_from_the_last_checkpoint(tmp_path):
    out, whole = str(tmp_path / "elastic"), str(tmp_path / "whole")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # restarts every 3 steps, checkpoints every 2: a checkpoint holds code-use counts that all ranks added to
    args = [os.path.join(ROOT, "train.py"), "--stage", "1", "--max-steps", "30", *TINY, "--set", "train.restart_every=3"]
    assert run(torchrun + args + ["--out", whole]).returncode == 0
    with launched(torchrun + ["--max-restarts=1"] + args + ["--out", out]) as proc:
        wait_for(os.path.join(out, "train_state.safetensors"), proc)
        workers = torchrun_workers(proc.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout and "weights identical across 2 ranks: True" in stdout
    assert_same_state(whole, out)


# ----------------------------------------------------------------------------- bad commands

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths to good and bad checkpoints: the shipped pair, a tokenizer it was not trained on, junk."""
    d = tmp_path_factory.mktemp("files")
    other = str(d / "other")
    train.main(["--stage", "1", "--out", other, "--max-steps", "1", *TINY])
    junk = d / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).bytes(300))
    torn = d / "torn"
    torn.mkdir()
    (torn / "train_state.safetensors").write_bytes(b"torn")
    (d / "empty").mkdir()
    (d / "tars").mkdir()
    (d / "tars" / "shard-000.tar").write_bytes(b"")
    return {"empty": str(d / "empty"), "gen": shipped(DEFAULT_WORLD, "generator"), "tok": shipped(DEFAULT_WORLD, "tokenizer"), "junk": str(junk), "torn": str(torn),
            "other": os.path.join(other, "model.safetensors"), "state": os.path.join(other, "train_state.safetensors"),
            "missing": str(d / "missing.safetensors"), "tars": str(d / "tars")}


SAMPLE, EVALUATE = [sys.executable, os.path.join(ROOT, "sample.py")], [sys.executable, os.path.join(ROOT, "evaluate.py")]
BAD_COMMANDS = {
    "sample: missing checkpoint": (SAMPLE + ["a dog", "--checkpoint", "{missing}"], "no checkpoint at"),
    "sample: not a checkpoint": (SAMPLE + ["a dog", "--checkpoint", "{junk}"], "is not a safetensors checkpoint"),
    "sample: a tokenizer given as the generator": (SAMPLE + ["a dog", "--checkpoint", "{tok}"], "not a stage-2 generator"),
    "sample: a generator given as the tokenizer": (SAMPLE + ["a dog", "--tokenizer-checkpoint", "{gen}"],
                                                   "not a stage-1 tokenizer"),
    "sample: another tokenizer": (SAMPLE + ["a dog", "--tokenizer-checkpoint", "{other}"], "sha256 differs"),
    "sample: a train state given as the generator": (SAMPLE + ["a dog", "--checkpoint", "{state}"],
                                                     "is a train state (for --resume)"),
    "sample: empty prompt": (SAMPLE + ["  "], "prompt is empty"),
    "sample: unwritable --out": (SAMPLE + ["a dog", "--out", "/proc/nope/x.mp4"], "cannot write"),
    "sample: --frames zero": (SAMPLE + ["a dog", "--frames", "0"], "--frames must lie in 1 to 10000"),
    "sample: --steps zero": (SAMPLE + ["a dog", "--steps", "0"], "--steps must lie in 1 to 1000"),
    "sample: --cfg nan": (SAMPLE + ["a dog", "--cfg", "nan"], "--cfg must lie in 0 to 1000"),
    "sample: --temperature negative": (SAMPLE + ["a dog", "--temperature", "-1"], "--temperature must lie in 0 to 1000"),
    "sample: --keep zero": (SAMPLE + ["a dog", "--keep", "0"], "--keep must be at least 1"),
    "sample: --samples zero": (SAMPLE + ["a dog", "--samples", "0"], "--samples must lie in 1 to 64"),
    "evaluate: missing checkpoint": (EVALUATE + ["{missing}"], "no checkpoint at"),
    "evaluate: not a checkpoint": (EVALUATE + ["{junk}"], "is not a safetensors checkpoint"),
    "evaluate: another tokenizer": (EVALUATE + ["{gen}", "--tokenizer-checkpoint", "{other}"], "sha256 differs"),
    "train: missing tokenizer": (TRAIN[:2] + ["--stage", "2", "--tokenizer-checkpoint", "{missing}"], "no checkpoint at"),
    "train: a generator given as the tokenizer": (TRAIN[:2] + ["--stage", "2", "--tokenizer-checkpoint", "{gen}"],
                                                  "not a stage-1 tokenizer"),
    "train: unknown preset": (TRAIN + ["--preset", "huge"], "unknown preset"),
    "train: unknown config key": (TRAIN + ["--set", "train.speed=11"], "unknown config key"),
    "train: frames not 1 + 2n": (TRAIN + ["--set", "train.frames=10"], "must be 1 + 2n"),
    "train: unwritable --out": (TRAIN + ["--out", "/proc/nope"], "cannot write to --out"),
    "train: an empty data folder": (TRAIN + ["--data", "{empty}"], "no videos found in"),
    "train: a missing data folder": (TRAIN + ["--data", "{missing}"], "no such folder or file"),
    "train: a folder of tar shards": (TRAIN + ["--data", "{tars}"], "is a folder of tar shards: pass them as"),
    "train: a misspelt key": (TRAIN + ["--set", "trian.lr=1e-4"], "Did you mean train.lr?"),
    "train: nothing readable to resume": (TRAIN + ["--out", "{torn}", "--resume"], "no readable train state to resume from"),
}


@pytest.mark.parametrize("name", BAD_COMMANDS)
def test_a_bad_command_is_one_line_and_exit_code_2(files, name):
    cmd, message = BAD_COMMANDS[name]
    result = run([part.format(**files) for part in cmd])
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_data_with_nothing_usable_stops_the_run_naming_the_folder(tmp_path, workers):
    folder = tmp_path / "videos"
    folder.mkdir()
    for k in range(3):
        (folder / f"{k}.mp4").write_bytes(np.random.default_rng(k).bytes(2000))
    result = run(TRAIN + ["--out", str(tmp_path / "out"), "--data", str(folder), "--max-steps", "2", *TINY,
                          "--set", f"train.workers={workers}"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # the held-out clips load first: one line for each file tried, once; with none readable the run goes on
    # without val_ figures; then the training clips fail too, and the error names the data and counts files
    warning = [i for i, line in enumerate(lines) if "training without val_ figures" in line]
    assert len(warning) == 1 and lines[warning[0]].startswith(f"warning: the held-out files of {folder}: nothing loads")
    skipped = [line for line in lines if line.startswith("skipped clip")]
    assert 2 <= len(skipped) <= 6 and len(set(skipped)) == len(skipped) and len(lines) == len(skipped) + 2
    assert re.match(rf"error: {re.escape(str(folder))}: nothing loads \([1-3] file\(s\) failed, 20 tries in a row\)", lines[-1])


def video_folder(tmp_path, n: int):
    """A folder of n good 5-frame 32 x 32 Shapes videos, 0.mp4 ... """
    from worlds.shapes import ShapesSource
    from media.video import write_video
    folder = tmp_path / "videos"
    folder.mkdir()
    shapes = ShapesSource(frames=5, size=32)
    for k in range(n):
        write_video(str(folder / f"{k}.mp4"), shapes.load(k)[0])
    return folder


def test_data_that_goes_bad_mid_run_stops_it_in_one_line(tmp_path):
    """A mount that fails under a DataLoader worker: the worker's error reaches the user as one line."""
    folder = video_folder(tmp_path, 4)
    out = str(tmp_path / "out")
    with launched(TRAIN + ["--out", out, "--data", str(folder), "--max-steps", "100000", *TINY,
                           "--set", "train.workers=1"]) as proc:
        wait_for(os.path.join(out, "train_state.safetensors"), proc)
        for k in range(4):
            (folder / f"{k}.mp4").write_bytes(b"gone")
        _, stderr = proc.communicate(timeout=120)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in stderr
    assert lines[-1].startswith(f"error: {folder}: nothing loads (")


def test_skipped_and_dropped_files_are_counted_in_the_log(tmp_path):
    from data import make_source
    from kit.stream import ClipStream
    folder = video_folder(tmp_path, 3)
    (folder / "broken.mp4").write_bytes(b"not a video")  # trained on: 1.mp4 is the held-out file
    (folder / "captions.csv").write_text("0.mp4,a\n1.mp4,b\n2.mp4,c\nbroken.mp4,d\nmissing.mp4,e\n")
    out = str(tmp_path / "out")
    result = run(TRAIN + ["--out", out, "--data", str(folder), "--max-steps", "6", *TINY])
    assert result.returncode == 0, result.stderr[-2000:]
    source = make_source(str(folder), 3, 32, split="train")
    assert [p.name for p, _ in source.held_out] == ["1.mp4"]
    stream = ClipStream(source, 2)
    expected = source.dropped + sum(stream.batch(b)["skipped"] for b in range(6))
    assert source.dropped == 1 and expected >= 2
    assert json.loads(open(os.path.join(out, "log.jsonl")).readlines()[-1])["skipped_files"] == expected


def test_frames_not_1_plus_2n_are_rounded_up_and_said(tmp_path):
    out = str(tmp_path / "v.mp4")
    result = run(SAMPLE + ["a red circle moving right", "--frames", "10", "--steps", "2", "--out", out])
    assert result.returncode == 0 and "--frames 10 is not 1 + 2n; making 11" in result.stdout
    assert "frames: 11" in result.stdout
