import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from kit.checkpoint import load_tokenizer, read_header
from kit.distributed import check_gpus
from kit.faults import UsageError
from maskgit import MaskGIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a model and a run small enough for a test: 3-frame 32 x 32 clips, batches of 2. The training tests mean
# the CPU (gloo, exact fp32 sums), on a GPU workstation too
TINY = ["--device", "cpu", "--tokenizer", "vqgan", "--set", "model.widths=8,16,16", "--set", "model.codebook_size=32", "--set", "model.code_dim=4",
        "--set", "train.frames=3", "--set", "train.image_size=32", "--set", "train.batch_size=2",
        "--set", "train.warmup=2", "--set", "train.restart_every=2", "--set", "train.log_every=1",
        "--set", "train.image_every=100", "--set", "train.save_every=2", "--set", "train.fold_cosine=0"]
# a generator to match: 2 latent frames of 4 x 4 codes, width 32
TINY_GENERATOR = ["--device", "cpu", "--set", "model.dim=32", "--set", "model.depth=1", "--set", "model.heads=2", "--set", "model.mlp=64",
                  "--set", "model.text.dim=32", "--set", "model.text.depth=1", "--set", "model.text.heads=2",
                  "--set", "model.text.mlp=64", "--set", "model.text.vocab_size=300", "--set", "model.codebook_size=32",
                  "--set", "train.frames=3", "--set", "train.image_size=32", "--set", "train.batch_size=4",
                  "--set", "train.cache_clips=8", "--set", "train.warmup=2", "--set", "train.log_every=1",
                  "--set", "train.image_every=2", "--set", "train.save_every=2", "--set", "train.sample_steps=2"]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_cli_rejects_unknown_key_and_preset_with_one_line():
    for bad in (["--set", "train.nope=1"], ["--preset", "huge"], ["--set", "optimizer.lr=1"]):
        result = run_cli("--stage", "1", *bad)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train.main(["--stage", "1", "--out", whole, "--max-steps", "4", *TINY])
    train.main(["--stage", "1", "--out", parts, "--max-steps", "2", *TINY])
    # the resumed run is told the same total length, so its schedule matches the uninterrupted one
    train.main(["--stage", "1", "--out", parts, "--max-steps", "4", "--resume", *TINY])
    a = load_file(os.path.join(whole, "train_state.safetensors"))
    b = load_file(os.path.join(parts, "train_state.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in open(os.path.join(parts, "log.jsonl"))]
    assert steps == [1, 2, 3, 4]


def test_resume_reuses_the_saved_config_and_changes_only_what_may_change(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--stage", "1", "--out", out, "--max-steps", "2", *TINY])
    # no --set repeated: the run's own config comes back; a longer schedule is a resumable change
    result = run_cli("--stage", "1", "--out", out, "--resume", "--max-steps", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note: train.max_steps changes from 2 to 3 on resume" in result.stdout
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))] == [1, 2, 3]
    assert os.path.getsize(os.path.join(out, "loss.png")) > 0  # drawn at the saves, though image_every is 100
    for change, key in ((["--set", "model.codebook_size=64"], "model.codebook_size"),
                        (["--set", "train.batch_size=4"], "train.batch_size"), (["--data", "/nowhere"], "train.data")):
        result = run_cli("--stage", "1", "--out", out, "--resume", "--device", "cpu", *change)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {key} cannot change on resume")
        assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, warmup", [([], 200), (["--max-steps", "400"], 10), (["--max-steps", "20000"], 200),
                                           (["--max-steps", "400", "--set", "train.warmup=50"], 50),
                                           (["--set", "train.max_steps=400"], 10)])  # the same run, spelt otherwise
def test_a_short_run_warms_up_in_proportion(tmp_path, flags, warmup):
    # tiny: 8000 steps
    plan = train.setup(train.parse_args(["--stage", "1", "--out", str(tmp_path), *flags]))
    assert plan.cfg.warmup == warmup


def test_an_out_that_holds_a_run_needs_resume_or_force(tmp_path):
    out = str(tmp_path / "run")
    result = run_cli("--stage", "1", "--out", out, "--resume", *TINY)
    assert result.returncode == 2 and "nothing to resume in" in result.stderr  # not a silent fresh start
    train.main(["--stage", "1", "--out", out, "--max-steps", "2", *TINY])
    result = run_cli("--stage", "1", "--out", out, "--max-steps", "1", *TINY)
    assert result.returncode == 2 and "already holds a run (step 2): add --resume" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert load_file(os.path.join(out, "train_state.safetensors"))  # untouched
    result = run_cli("--stage", "1", "--out", out, "--max-steps", "1", "--force", *TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))] == [1]  # a new log


def test_finished_run_folds_near_duplicate_codes_in_the_sampling_weights_only(tmp_path):
    out = str(tmp_path / "merge")
    train.main(["--stage", "1", "--out", out, "--max-steps", "2", *TINY, "--set", "train.fold_cosine=0.5"])
    model, meta = load_tokenizer(os.path.join(out, "model.safetensors"))
    owners = model.quantizer.alias.unique()
    assert int(meta["codes_left"]) == len(owners) < 32  # 32 codes in 4 dimensions: many lie within 60 degrees
    assert (model.quantizer.alias[owners] == owners).all()  # an owner stands for itself
    state = load_file(os.path.join(out, "train_state.safetensors"))
    assert torch.equal(state["model.quantizer.alias"], torch.arange(32))  # --resume continues from the raw book


def test_the_ema_tokenizer_takes_the_codebook_after_kmeans_and_restarts(tmp_path):
    """k-means (first forward) and dead-code restarts move codes at once; the EMA copy must take them as
    they are, or its codebook stays the random init for thousands of steps and picks other codes."""
    out = str(tmp_path / "ema")
    train.main(["--stage", "1", "--out", out, "--max-steps", "4", *TINY, "--set", "train.ema=0.999"])
    state = load_file(os.path.join(out, "train_state.safetensors"))
    live, ema = state["model.quantizer.codebook"], state["ema.quantizer.codebook"]
    cosine = torch.nn.functional.cosine_similarity(live, ema, dim=1)  # each code against its EMA twin
    assert cosine.min() > 0.99, cosine.min()


def test_gan_phase_trains_both_networks(tmp_path):
    out = str(tmp_path / "gan")
    train.main(["--stage", "1", "--out", out, "--max-steps", "2", *TINY, "--set", "train.gan_start=0"])
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert all(rec["disc"] > 0 for rec in log)
    state = load_file(os.path.join(out, "train_state.safetensors"))
    assert any(k.startswith("opt_d.") for k in state)  # the discriminator's optimizer has taken steps


def test_two_process_torchrun_keeps_ranks_identical(tmp_path):
    out = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--stage", "1", "--out", out, "--max-steps", "3", *TINY,
           "--set", "train.gan_start=1"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical across 2 ranks: True" in result.stdout
    assert os.path.exists(os.path.join(out, "model.safetensors"))


def test_two_process_torchrun_trains_the_generator_from_a_sharded_cache(tmp_path):
    tok_out = str(tmp_path / "tok")
    train.main(["--stage", "1", "--out", tok_out, "--max-steps", "1", *TINY])
    out = str(tmp_path / "gen")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--stage", "2", "--tokenizer-checkpoint", os.path.join(tok_out, "model.safetensors"),
           "--out", out, "--max-steps", "2", *TINY_GENERATOR, "--image-ratio", "0.5"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights identical across 2 ranks: True" in result.stdout
    shards = sorted(os.listdir(os.path.join(out, "token_cache")))
    assert shards == ["tokens-000-of-002.safetensors", "tokens-001-of-002.safetensors"]


def test_fsdp_shards_train_and_resume_as_ddp_does(tmp_path):
    """Two ranks under FSDP (stopped at step 3, resumed to 4) end where two DDP ranks do: the
    gathered weights, the EMA and the AdamW moments of train_state all match."""
    tok_out = str(tmp_path / "tok")
    train.main(["--stage", "1", "--out", tok_out, "--max-steps", "1", *TINY])
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(out: str, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "train.py"), "--stage", "2", "--out", out, *TINY_GENERATOR, "--set", "train.ema=0.9",
               "--tokenizer-checkpoint", os.path.join(tok_out, "model.safetensors"), *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    ddp, fsdp = str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    # samples at step 2 (image_every) in the middle of a process: the EMA is updated after sampling
    torchrun(ddp, "--max-steps", "4", "--set", "train.save_every=4")
    torchrun(fsdp, "--max-steps", "3", "--fsdp", "--set", "train.save_every=4")
    torchrun(fsdp, "--max-steps", "4", "--fsdp", "--resume", "--set", "train.save_every=4")
    a, b = (load_file(os.path.join(d, "train_state.safetensors")) for d in (ddp, fsdp))
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a) and any(".exp_avg_sq" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_more_ranks_than_gpus_is_one_line_not_an_nccl_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a workstation with one GPU
    with pytest.raises(UsageError, match="started 2 processes on this node, which has 1 GPU: use --nproc_per_node=1"):
        check_gpus(torch.device("cuda"), 2)
    check_gpus(torch.device("cuda"), 1)  # one rank per GPU is fine
    check_gpus(torch.device("cpu"), 8)  # gloo ranks need no GPU
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"), "--stage", "1", "--device", "cuda", "--max-steps", "1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))  # no GPU at all
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and ours == ["error: torchrun started 2 processes on this node, which has no GPUs: "
                                               "use --device cpu (gloo on the CPU)"]
    assert "nccl" not in result.stderr.lower()


def test_fsdp_outside_torchrun_or_in_stage_1_is_refused():
    for stage in (["--stage", "1"], ["--stage", "2", "--tokenizer-checkpoint", "none.safetensors"]):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *stage, "--fsdp"],
                                capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--fsdp" in result.stderr


def test_ddp_resume_between_code_restarts_equals_an_uninterrupted_run(tmp_path):
    """Code-use counts are per rank between restarts (every 4 steps here); a checkpoint at step 6
    must carry all ranks' counts, and only rank 0 may carry them on, or the counts the run saves at
    step 7 (before the next restart uses them) differ. Constant lr after warm-up, so that stopping by
    --max-steps does not change the schedule."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(out: str, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, "train.py"), "--stage", "1", "--out", out, *TINY, "--set", "train.restart_every=4",
               "--set", "train.save_every=100", "--set", "train.min_lr=3e-4", *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    torchrun(whole, "--max-steps", "7")
    torchrun(parts, "--max-steps", "6")
    torchrun(parts, "--max-steps", "7", "--resume")
    a, b = (load_file(os.path.join(d, "train_state.safetensors")) for d in (whole, parts))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- stage 2

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    train.main(["--stage", "1", "--out", out, "--max-steps", "2", *TINY])
    return os.path.join(out, "model.safetensors")


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


def test_generator_vocabulary_must_match_the_tokenizer(tokenizer, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--stage", "2", "--tokenizer-checkpoint", tokenizer, "--out", str(tmp_path), *TINY_GENERATOR,
                    "--set", "model.codebook_size=64"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "must equal the tokenizer's codebook size (32)" in err


def test_stage2_trains_with_the_continuation_masks_it_is_given(tokenizer, tmp_path, monkeypatch):
    """train.prefix_masks and train.prefix_frames reach the masks of every training step."""
    seen, draw = [], MaskGIT.mask_positions

    def spy(self, codes, frames=None, prefix=0.0, prefix_frames=0):
        seen.append((prefix, prefix_frames))
        return draw(self, codes, frames, prefix, prefix_frames)

    monkeypatch.setattr(MaskGIT, "mask_positions", spy)
    train.main(["--stage", "2", "--tokenizer-checkpoint", tokenizer, *TINY_GENERATOR, "--max-steps", "1",
                "--set", "train.image_every=100", "--set", "train.prefix_masks=0.5",
                "--set", "train.prefix_frames=1", "--out", str(tmp_path)])
    # the training step's masks (validation and the probe draw plain ones)
    assert (0.5, 1) in seen and (0.5, 0) not in seen


def run_through_and_resumed(common: list[str], tmp_path) -> str:
    """Run `common` for 4 steps, and again for 2 then --resume to 4; assert both end on the same
    weights -> the resumed run's folder."""
    whole = str(tmp_path / "whole")
    split = str(tmp_path / "split")
    train.main(common + ["--out", whole, "--max-steps", "4"])
    train.main(common + ["--out", split, "--max-steps", "2"])
    train.main(common + ["--out", split, "--max-steps", "4", "--resume"])
    a = load_file(os.path.join(whole, "model.safetensors"))
    b = load_file(os.path.join(split, "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    return split


def test_stage2_resume_matches_an_uninterrupted_run(tokenizer, tmp_path):
    common = ["--stage", "2", "--tokenizer-checkpoint", tokenizer, *TINY_GENERATOR, "--set", "train.image_every=100"]
    run_through_and_resumed(common, tmp_path)


def test_init_fine_tunes_a_generator_from_its_file(generator, tokenizer, tmp_path, capsys):
    """--init starts from the file's weights and caption tokenizer, not from a fresh init; a model
    field set beside it, or a file trained behind another tokenizer, is one line."""
    common = ["--stage", "2", "--tokenizer-checkpoint", tokenizer, *TINY_GENERATOR,
              "--set", "train.image_every=100", "--set", "train.lr=0"]
    out = str(tmp_path / "tuned")
    # lr 0: the weights stay where they started; other clips, whose captions would train another BPE
    train.main(common + ["--out", out, "--max-steps", "1", "--init", generator,
                         "--set", "train.cache_clips=24", "--set", "train.seed=5"])
    start = load_file(generator)
    tuned = load_file(os.path.join(out, "model.safetensors"))
    assert all(tuned[k].equal(start[k]) for k in start)
    # the caption tokenizer travels in the metadata
    assert read_header(os.path.join(out, "model.safetensors"))[0]["text_tokenizer"] == \
        read_header(generator)[0]["text_tokenizer"]
    with pytest.raises(SystemExit) as exit_info:
        train.main(common + ["--out", str(tmp_path / "wide"), "--init", generator, "--set", "model.dim=64"])
    assert exit_info.value.code == 2 and "whose dim is 32; drop --set model.dim" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train.main(common + ["--out", str(tmp_path / "other"), "--init", generator,
                             "--tokenizer-checkpoint", generator])
    assert exit_info.value.code == 2


def test_a_fine_tune_resumes_from_its_own_train_state_not_from_the_file(generator, tokenizer, tmp_path):
    """--init given again with --resume: the run goes on from its last save, so that stopping and
    resuming a fine-tune equals running it through."""
    common = ["--stage", "2", "--tokenizer-checkpoint", tokenizer, *TINY_GENERATOR,
              "--set", "train.image_every=100", "--init", generator]
    split = run_through_and_resumed(common, tmp_path)
    # steps 3 and 4 went on from the save at step 2: a fresh start from the file would log 1 to 4 again
    steps = [json.loads(line)["step"] for line in open(os.path.join(split, "log.jsonl"))]
    assert steps == [1, 2, 3, 4]
