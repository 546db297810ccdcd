import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_configuration_reports_time_throughput_memory_flops_and_mfu():
    r = bench.run_one("stream_short", torch.device("cpu"), repeats=1)
    assert r["ms"] > 0 and r["peak_mb"] >= 0 and r["gflop"] > 0 and r["matmul_tflops"] > 0
    assert r["tokens/s"] == pytest.approx(6 * 64 / (r["ms"] / 1e3))  # 6 latent frames of 8 x 8 codes per run
    assert r["mfu"] == pytest.approx(r["gflop"] * 1e9 / (r["ms"] / 1e3) / (r["matmul_tflops"] * 1e12))


def test_flops_are_counted_not_guessed():
    # a linear layer's forward is 2 * batch * in * out FLOPs
    layer = torch.nn.Linear(64, 32)
    assert bench.count_flops(lambda: layer(torch.randn(10, 64))) == 2 * 10 * 64 * 32


@pytest.mark.skipif(importlib.util.find_spec("phenaki_pytorch") is not None, reason="the peer is installed here")
def test_peer_missing_is_one_line_not_a_traceback():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--only", "maskgit_train", "--repeats", "1",
                             "--peer"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr
    assert "maskgit_train: ms" in result.stdout
    assert "maskgit_train [peer]: failed: phenaki-pytorch is not installed" in result.stdout


def test_a_long_video_reports_frames_per_second_and_whole_peak_memory():
    r = bench.run_one("long_video_11", torch.device("cpu"), repeats=1)
    assert r["frames/s"] == pytest.approx(11 / r["seconds"]) and r["peak_mb"] > 50  # the process, models loaded


def test_the_preset_generators_build_at_their_sizes():
    """maskgit_base / maskgit_paper time the presets' generators (on a GPU): built on the meta device
    here, their parameter counts are those of the README (138M and 1.73B with the text encoder)."""
    with torch.device("meta"):
        sizes = {name: sum(p.numel() for p in bench.build(name, torch.device("meta"))[3].parameters())
                 for name in bench.GPU_ONLY}
    assert round(sizes["maskgit_base"] / 1e6) == 138 and round(sizes["maskgit_paper"] / 1e8) == 17


def test_bf16_puts_the_cpu_training_step_under_autocast_and_reaches_the_child(monkeypatch):
    """--bf16 times what train.precision=bf16 trains: the CPU step's matmuls in bf16, in the child
    process that measures each configuration."""
    layer = torch.nn.Linear(8, 8)
    seen = []

    def loss() -> torch.Tensor:
        out = layer(torch.randn(4, 8))
        seen.append(out.dtype)
        return out.float().square().mean()

    for on, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(bench, "CPU_BF16", on)
        bench.train_step(layer, loss, torch.device("cpu"))()
        assert seen[-1] == dtype
    commands = []
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: commands.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0, stdout='{"ms": 1.0}\n', stderr=""))
    bench.main(["--only", "maskgit_tiny", "--bf16", "--repeats", "1"])
    assert "--bf16" in commands[0]
