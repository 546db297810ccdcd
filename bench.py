"""
How fast is this Phenaki? Every hot path timed the same way, on whatever device runs it.

    python bench.py                          # every configuration, on CUDA if present, else the CPU
    python bench.py --only maskgit_train     # one configuration (repeat --only for more)
    python bench.py --repeats 10 --json bench.json
    python bench.py --peer                   # also time phenaki-pytorch 0.5.0 on the same work
    python bench.py --compile                # training steps under torch.compile (or --channels-last)
    python bench.py --bf16                   # the CPU's steps under bf16 autocast (train.precision=bf16)
    python bench.py --only cvivit_train --profile   # where its time goes, op by op

Each configuration runs in a fresh subprocess (so that peak memory belongs to it alone), warms up,
then times `repeats` runs and reports the median:
  ms            median wall time of one run (a training step includes backward and the AdamW update)
  clips/s       clips (or images) per second;  tokens/s: latent codes per second
  peak_mb       CUDA: max_memory_allocated; CPU: growth of the process's peak resident set
  gflop         model FLOPs of one run, counted by torch.utils.flop_counter (matmuls, convolutions,
                attention; forward and backward), not estimated by formula
  mfu           model FLOPs per second / the peak FLOP/s of a large matmul measured in the same
                process on the same device: fp32 on the CPU, bf16 under autocast on CUDA (and on the
                CPU with --bf16)

With --peer, cvivit_train and maskgit_train also run through the earlier open implementation, the
pip package phenaki-pytorch==0.5.0, when it is installed (it is not a dependency of ours):
    pip install --no-deps phenaki-pytorch==0.5.0 einops beartype ema-pytorch vector-quantize-pytorch \
        einx loguru torch-einops-utils
Its modules import torchvision, transformers and accelerate at the top and fetch T5 and VGG weights
when asked; the bench stubs those modules (nothing of them is used) and builds the peer's models
without VGG and GAN, so it never touches the network. The bench prints both sides' parameter counts
and FLOPs beside the times, so that "the same work" can be checked, and peer ms / our ms.

The configurations:
  cvivit_train    C-ViViT dim 256, 2 + 2 layers, 8 heads of 32, K 1024, patch 8 (2 x 8 x 8 tubelets),
                  64 x 64, a batch of 2 clips of 9 frames
  vqgan_train     the tiny VQGAN preset, a batch of 8 clips of 11 frames at 64 x 64
  maskgit_train   MaskGIT dim 256, depth 4, 8 heads of 64, K 1024, 320 positions (5 x 8 x 8), 16 text
                  states of width 768, batch 2
  maskgit_tiny    the tiny generator preset as train.py runs it: batch 32 over 6 x 8 x 8 codes
  maskgit_base    the base generator preset (138M with its text encoder), batch 32 over 6 x 16 x 16 codes;
  maskgit_paper   the paper preset (1.73B with it), batch 16 over 6 x 16 x 16 codes. These two run on CUDA, or on
                  any device when named with --only (the paper one needs ~30 GB in fp32 with AdamW)
  encode, decode  the tiny C-ViViT preset, a batch of 8 clips of 11 frames
  stream_short    the tiny VQGAN streams one clip of 6 latent frames (11 frames) out of its decoder
  stream_long     the same for 60 latent frames (119 frames): 10x the length, cost linear in it
  sample          one 11-frame clip from text with the default sampling settings (maskgit.py), then decode
  sample_batch8   the same for 8 clips of one prompt in one batch (sample.py --samples 8)
  long_video_N    the shipped Shapes pair makes one N-frame video (N = 11, 101, 1025) from one prompt, as
                  sample.py does, frames thrown away as they come: frames/s of video and the process's
                  whole peak memory (peak_mb here is ru_maxrss, not its growth). One timed run, no warm-up.
  data            decoding real .mp4 files the bench writes itself into 11-frame 64 x 64 clips, on one core
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cvivit import CViViT, CViViTConfig
from kit.config import generator_preset, tokenizer_preset
from kit.distributed import compile_blocks
from maskgit import MaskGIT, MaskGITConfig
from text_encoder import TextEncoderConfig
from vqgan import VQGAN

# Legend: B batch, T frames, t h w latent grid, N codes, L text length.

LONG_VIDEOS = {"long_video_11": 11, "long_video_101": 101, "long_video_1025": 1025}
# too large for a CPU's memory or patience: run when named with --only
GPU_ONLY = ("maskgit_base", "maskgit_paper")
CONFIGS = ("cvivit_train", "vqgan_train", "maskgit_train", "maskgit_tiny", "encode", "decode",
           "stream_short", "stream_long", "sample", "sample_batch8", "data", *LONG_VIDEOS,
           *GPU_ONLY)
PEER_CONFIGS = ("cvivit_train", "maskgit_train")
# what --compile applies to
TRAINING = ("cvivit_train", "vqgan_train", "maskgit_train", "maskgit_tiny", *GPU_ONLY)


# --bf16: the CPU's training steps and matmul roof in bf16, as on CUDA
CPU_BF16 = False


def bf16(device: torch.device) -> bool:
    """Whether a step runs under bf16 autocast: on CUDA, and on a CPU with --bf16."""
    return device.type == "cuda" or CPU_BF16


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of a large square matmul: the roof MFU is measured against."""
    n = 4096 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if bf16(device) else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats=10)
    return 2 * n**3 / seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` runs, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def train_step(model: torch.nn.Module, loss_fn, device: torch.device):
    """One optimizer step as train.py takes it: forward under bf16 autocast (on CUDA, or with
    --bf16), backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), 1e-4, fused=device.type == "cuda")

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16(device)):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def tokenizer_step(model, video: torch.Tensor, device: torch.device):
    def loss() -> torch.Tensor:
        out = model(video)
        return F.mse_loss(out.recon.float(), video) + out.vq_loss
    return train_step(model, loss, device)


def build(name: str, device: torch.device) -> tuple:
    """-> (function to time, clips per run, codes per run, parameters)."""
    torch.manual_seed(0)
    if name == "cvivit_train":
        model = CViViT(CViViTConfig(dim=256, spatial_depth=2, temporal_depth=2, heads=8, mlp=1024,
                                    codebook_size=1024, code_dim=32)).to(device)
        video = torch.rand(2, 3, 9, 64, 64, device=device) * 2 - 1
        return tokenizer_step(model, video, device), 2, 2 * 5 * 64, model
    if name == "vqgan_train":
        model = VQGAN(tokenizer_preset("tiny", "vqgan")[0]).to(device)
        video = torch.rand(8, 3, 11, 64, 64, device=device) * 2 - 1
        return tokenizer_step(model, video, device), 8, 8 * 6 * 64, model
    if name.startswith("maskgit_"):
        if name == "maskgit_train":
            # text states come ready-made, as from a frozen text encoder
            config = MaskGITConfig(codebook_size=1024, latent_frames=5, grid=8, dim=256, depth=4,
                                   heads=8, head_dim=64, mlp=1024, text=TextEncoderConfig(dim=768))
            B = 2
            L = 16
        else:
            # a preset's generator as train.py runs it, its own text encoder included
            config, train_cfg = generator_preset(name.split("_")[1])
            B = train_cfg.batch_size
            L = 12
        model = MaskGIT(config).to(device)
        codes = torch.randint(config.codebook_size,
                              (B, config.latent_frames, config.grid, config.grid), device=device)
        text = torch.randn(B, L, config.text.dim, device=device)
        mask = torch.ones(B, L, dtype=torch.bool, device=device)

        def loss() -> torch.Tensor:
            tokens, masked = model.mask_positions(codes)
            states = text if name == "maskgit_train" else model.encode_text(
                torch.randint(2, 300, (B, L), device=device), mask)
            logits = model.logits(tokens, states, mask)
            return F.cross_entropy(logits.flatten(0, 3)[masked.flatten()].float(),
                                   codes.flatten()[masked.flatten()])

        return train_step(model, loss, device), B, codes.numel(), model
    if name in ("stream_short", "stream_long"):
        model = VQGAN(tokenizer_preset("tiny", "vqgan")[0]).to(device).eval()
        codes = torch.randint(1024, (1, 6 if name == "stream_short" else 60, 8, 8), device=device)
        return lambda: list(model.decode_stream(codes)), 1, codes.numel(), model
    model = CViViT(tokenizer_preset("tiny", "cvivit")[0]).to(device).eval()
    video = torch.rand(8, 3, 11, 64, 64, device=device) * 2 - 1
    if name == "encode":
        return lambda: model.encode(video), 8, 8 * 6 * 64, model
    if name == "decode":
        codes = model.encode(video)
        return lambda: model.decode(codes), 8, codes.numel(), model
    if name in ("sample", "sample_batch8"):
        config, _ = generator_preset("tiny")
        generator = MaskGIT(config).to(device).eval()
        B = 1 if name == "sample" else 8
        ids = torch.randint(2, 300, (1, 8), device=device).expand(B, -1)
        mask = torch.ones(B, 8, dtype=torch.bool, device=device)
        return lambda: model.decode(generator.generate(ids, mask)), B, B * 6 * 64, generator
    raise ValueError(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")


def import_peer():
    """-> phenaki-pytorch's (cvivit module, phenaki module), with its
    unused heavy imports stubbed."""
    import importlib.machinery
    import types

    class Anything(type):
        # a class whose every attribute and call is another harmless class
        def __getattr__(cls, name):
            return Anything(name, (), {})

        def __call__(cls, *args, **kwargs):
            return cls

    class Stub(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Anything(name, (), {})

    for name in ("torchvision", "torchvision.transforms", "torchvision.models", "torchvision.utils",
                 "torchvision.datasets", "transformers", "accelerate", "torchtyping", "cv2",
                 "sentencepiece"):
        if name not in sys.modules:
            module = Stub(name)
            module.__path__ = []
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            sys.modules[name] = module
    import phenaki_pytorch.cvivit as peer_cvivit
    import phenaki_pytorch.phenaki_pytorch as peer_phenaki
    return peer_cvivit, peer_phenaki


def build_peer(name: str, device: torch.device) -> tuple:
    """The peer's models on the same work as build(name): -> (function to time, clips,
    codes, model)."""
    peer_cvivit, peer_phenaki = import_peer()
    torch.manual_seed(0)
    if name == "cvivit_train":
        model = peer_cvivit.CViViT(dim=256, codebook_size=1024, image_size=64, patch_size=8,
                                   temporal_patch_size=2, spatial_depth=2, temporal_depth=2,
                                   heads=8, dim_head=32, use_vgg_and_gan=False,
                                   lookup_free_quantization=False).to(device)
        video = torch.rand(2, 3, 9, 64, 64, device=device) * 2 - 1
        return train_step(model, lambda: model(video), device), 2, 2 * 5 * 64, model
    if name == "maskgit_train":
        model = peer_phenaki.MaskGit(dim=256, num_tokens=1024, max_seq_len=320, depth=4, heads=8,
                                     dim_head=64, dim_context=768).to(device)
        B = 2
        shape = (5, 8, 8)
        codes = torch.randint(1024, (B, *shape), device=device).flatten(1)  # (B, N)
        text = torch.randn(B, 16, 768, device=device)

        def loss() -> torch.Tensor:
            # the masking and loss of the peer's Phenaki.forward
            step = torch.randint(0, 18, (B,), device=device)
            everything = torch.ones_like(codes, dtype=torch.bool)
            masked = peer_phenaki.get_mask_subset_with_prob(everything, torch.cos(step * math.pi * 0.5 / 18))
            tokens = torch.where(masked, model.mask_id, codes).view(B, *shape)
            logits = model(tokens, video_mask=everything, cond_drop_prob=0.1,
                           text_mask=everything[:, :16], context=text)
            return F.cross_entropy(logits[masked], codes[masked])

        return train_step(model, loss, device), B, codes.numel(), model
    raise ValueError(f"the peer runs only {', '.join(PEER_CONFIGS)}")


def bench_data(repeats: int) -> dict:
    """Decoded clips per second on one core, from .mp4 files written here first."""
    from data import VideoFolderSource
    from worlds.shapes import ShapesSource
    from media.video import write_video
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        shapes = ShapesSource(frames=48, size=128)
        with open(os.path.join(folder, "captions.csv"), "w") as f:
            for k in range(8):
                video, text = shapes.load(k)
                # 2 s of 128 x 128 at 24 fps
                write_video(os.path.join(folder, f"{k}.mp4"), video, fps=24)
                f.write(f"{k}.mp4,{text}\n")
        source = VideoFolderSource(folder, frames=11, size=64, fps=8.0)
        k = iter(range(10**6))
        seconds = timed(lambda: source.load(next(k)), torch.device("cpu"), repeats=max(repeats, 8))
    return {"ms": seconds * 1e3, "clips/s": 1 / seconds, "tokens/s": 6 * 64 / seconds}


def bench_long_video(frames: int, device: torch.device) -> dict:
    """Frames per second of one streamed video from the shipped Shapes pair, and the process's
    peak memory."""
    from kit.checkpoint import load_generator, shipped
    from maskgit import stream_video
    model, text, tokenizer, _ = load_generator(shipped("shapes", "generator"),
                                               shipped("shapes", "tokenizer"))
    model = model.to(device)
    tokenizer = tokenizer.to(device)
    prompt = tuple(x.to(device) for x in text.encode(["a large red circle moving right"], model.config.text.max_len))
    start = time.perf_counter()
    for _ in stream_video(model, tokenizer, [prompt], [frames],
                          generator=torch.Generator(device).manual_seed(0)):
        # sample.py writes each piece out here
        pass
    sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    return {"seconds": seconds, "frames/s": frames / seconds, "peak_mb": peak}


def run_one(name: str, device: torch.device, repeats: int, peer: bool = False,
            compile: bool = False, channels_last: bool = False) -> dict:
    """Measure one configuration in this process (through the peer's models if `peer`), optionally
    with the model's forward under torch.compile or its conv weights in channels-last layout."""
    if name == "data":
        return bench_data(repeats)
    if name in LONG_VIDEOS:
        return bench_long_video(LONG_VIDEOS[name], device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn, clips, tokens, model = (build_peer if peer else build)(name, device)
    if channels_last:
        # the convs then run in (N, T, H, W, C) order, inputs converted on the fly
        model.to(memory_format=torch.channels_last_3d)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # counted eagerly; compilation happens in the warm-up runs below
    flops = count_flops(fn)
    if compile and name in TRAINING and not peer:
        # as train.py --compile does; other paths call methods, not forward
        compile_blocks(model)
    seconds = timed(fn, device, repeats)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            # ru_maxrss is in KiB
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("text."))
    peak_flops = matmul_peak(device)
    return {"ms": seconds * 1e3, "clips/s": clips / seconds, "tokens/s": tokens / seconds,
            "peak_mb": peak, "gflop": flops / 1e9, "mfu": flops / seconds / peak_flops,
            "params_m": params / 1e6, "matmul_tflops": peak_flops / 1e12}


def profile(name: str, device: torch.device, peer: bool, rows: int = 20) -> None:
    """Where one configuration's time goes: torch.profiler over 3 runs after 2 warm-ups, ops sorted
    by their own time (children excluded), the top `rows` of them."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    fn = (build_peer if peer else build)(name, device)[0]
    for _ in range(2):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{name}{' [peer]' if peer else ''}, 3 runs:")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def run_child(name: str, args, peer: bool = False) -> dict | str:
    """One configuration in a fresh process: -> its results, or the reason it failed."""
    switches = {"--peer-side": peer, "--compile": args.compile, "--channels-last": args.channels_last,
                "--bf16": args.bf16}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--only", name, "--repeats", str(args.repeats),
           "--device", args.device] + [flag for flag, on in switches.items() if on]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit status {done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def show(name: str, result: dict) -> None:
    print(f"{name}: " + " ".join(f"{k} {v:.3g}" for k, v in result.items()), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Benchmark phenaki's hot paths.")
    p.add_argument("--only", action="append", choices=CONFIGS, help="run just these configurations")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed runs per configuration (the median is reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peer", action="store_true",
                   help="also run phenaki-pytorch 0.5.0 where it has the configuration")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--compile", action="store_true",
                   help="time our training steps with each transformer block (or the tokenizer) under torch.compile")
    p.add_argument("--channels-last", action="store_true",
                   help="time the conv weights in channels-last (3D) layout")
    p.add_argument("--bf16", action="store_true",
                   help="on the CPU too, the training steps under bf16 autocast and a bf16 roof")
    # one configuration, JSON on stdout
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    # the child times the peer
    p.add_argument("--peer-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true",
                   help="print where the time of each --only configuration goes")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    global CPU_BF16
    CPU_BF16 = args.bf16
    if args.profile:
        for name in args.only or CONFIGS:
            if name != "data":
                # decoding files: nothing of ours to profile op by op
                profile(name, device, peer=False)
            if args.peer and name in PEER_CONFIGS:
                profile(name, device, peer=True)
        return
    if args.child:
        print(json.dumps(run_one(args.only[0], device, args.repeats, args.peer_side, args.compile,
                                 args.channels_last)))
        return
    results = {}
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else f'cpu, {torch.get_num_threads()} threads'}")
    chosen = args.only or [c for c in CONFIGS if c not in GPU_ONLY or device.type == "cuda"]
    for name in chosen:
        ours = run_child(name, args)
        if isinstance(ours, str):
            print(f"{name}: failed: {ours}")
            continue
        results[name] = ours
        show(name, ours)
        if not (args.peer and name in PEER_CONFIGS):
            continue
        peer = run_child(name, args, peer=True)
        if isinstance(peer, str):
            if "phenaki_pytorch" in peer:
                peer = "phenaki-pytorch is not installed (see the top of bench.py for the pip line)"
            print(f"{name} [peer]: failed: {peer}")
            continue
        results[name + "_peer"] = peer
        show(name + " [peer]", peer)
        print(f"{name}: ours is {peer['ms'] / ours['ms']:.2f}x faster than the peer; peak memory ours/peer "
              f"{ours['peak_mb'] / max(peer['peak_mb'], 1e-9):.2f}; parameters ours/peer "
              f"{ours['params_m'] / peer['params_m']:.3f}", flush=True)
    if "stream_short" in results and "stream_long" in results:
        ratio = results["stream_long"]["ms"] / results["stream_short"]["ms"]
        print(f"streamed decoding: 10x the length costs {ratio:.1f}x the time")
    if "sample" in results and "sample_batch8" in results:
        ratio = results["sample_batch8"]["clips/s"] / results["sample"]["clips/s"]
        print(f"--samples 8: each video {ratio:.1f}x faster than in a run of its own")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
