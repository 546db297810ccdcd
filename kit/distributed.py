"""
The distributed run: how the processes of `torchrun` meet, how a model is spread over them, and how
they leave together. train.py joins the process group in one block (nccl on CUDA, gloo on the CPU);
what that block and the loops need beyond plain DDP lives here.

Meeting again after a restart. `torchrun --max-restarts=N` starts a new group of workers when one
dies; they meet in the agent's store, where the dead workers' addresses are still written. A
restarted group therefore meets under a key prefix of its own (`process_group_store`).

Replicated or sharded. Under DDP every rank holds the whole model and gradients are averaged. Under
FSDP2 (`shard`, stage 2 with --fsdp) each transformer block of the generator and of its caption
encoder is a unit whose parameters, gradients and AdamW moments are split across the ranks and
gathered only while the block runs; embeddings and head form the root unit. DDP and FSDP see a
module's `forward`, which is why a generator's forward is its training loss. Sampling calls other
methods: under FSDP it runs inside `gathered`, which holds the root unit whole meanwhile (each
block gathers its own as it runs).

Counting codes. The quantizer's code-use counts are per rank and summed only at a dead-code restart;
`summed_counts` sums them for the length of a save, so that a checkpoint holds all ranks' counts.

Leaving. `finish` checks that DDP ranks still hold identical weights (a cheap digest) and makes
every rank leave together: a rank that tears down its process group early can abort the others.

Legend: none of the tensors here have shapes worth naming; everything is a module or a state dict.
"""

import contextlib
import hashlib
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from kit.faults import UsageError, exit_usage
from maskgit import MaskGIT
from transformer import Block


def process_group_store(restarts: int) -> dict:
    """Keyword arguments for init_process_group: a fresh store prefix for a group that torchrun
    restarted (so that it cannot read the dead workers' addresses), nothing special otherwise."""
    if not restarts or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False)
    return {"store": dist.PrefixStore(f"restart-{restarts}", store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


def start(device_name: str, restarts: int) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or run alone ->
    (rank, world size, this process's device). One GPU per process; TF32 for the fp32 matmuls that
    autocast leaves. A node with fewer GPUs than processes: every rank leaves, one says why."""
    device = torch.device(device_name)
    if "RANK" in os.environ:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ["LOCAL_RANK"])
        try:
            check_gpus(device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        except UsageError as err:
            if local == 0:
                exit_usage(err)
            sys.exit(2)
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, **process_group_store(restarts))
    else:
        rank = 0
        world = 1
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


def check_device(name: str, gpus: bool = True) -> torch.device:
    """--device as a torch.device this build of torch can use, or a UsageError before any
    work starts. gpus=False leaves the GPUs to check_gpus (under torchrun, one rank of each
    node says what is missing)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; use cpu or cuda") from None
    if gpus and device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: phenaki runs on cpu or cuda")
    return device


def check_gpus(device: torch.device, local_world: int) -> None:
    """One GPU per process: refuse, in one line, more processes on a node than it has GPUs (nccl
    would fail later, in many lines, or two ranks would share a GPU)."""
    gpus = torch.cuda.device_count()
    if device.type == "cuda" and local_world > gpus:
        fix = f"use --nproc_per_node={gpus}, or --device cpu" if gpus else "use --device cpu"
        raise UsageError(f"torchrun started {local_world} processes on this node, which has {gpus or 'no'} "
                         f"GPU{'' if gpus == 1 else 's'}: {fix} (gloo on the CPU)")


def shard(root: nn.Module, device: torch.device) -> None:
    """FSDP2: every transformer block becomes a unit of its own, the rest the root's unit. On CUDA
    the all-gathers move bf16 and the gradients are reduced in fp32."""
    mixed = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda"
             else MixedPrecisionPolicy())
    for module in root.modules():
        if isinstance(module, Block):
            fully_shard(module, mp_policy=mixed)
    fully_shard(root, mp_policy=mixed)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile where the work is: each transformer block of a generator (the unit FSDP shards
    too), or a tokenizer's whole forward. In place: parameter names and checkpoints do not change."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks if isinstance(model, MaskGIT) else [model]:
        block.compile()


def grad_sync(module: nn.Module, last: bool):
    """Gradient accumulation: DDP and FSDP average gradients across ranks on the `last` micro-step
    of an optimizer step only; the earlier ones accumulate locally. -> a context for the backward."""
    if isinstance(module, DDP):
        return contextlib.nullcontext() if last else module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        # an FSDP2 unit
        module.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Sampling or measuring a generator outside its forward: an FSDP2-sharded root unit is gathered
    for the block and sharded again after it; any other model is used as it is."""
    if not hasattr(model, "unshard"):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


@contextlib.contextmanager
def summed_counts(quantizer: nn.Module, ddp: bool):
    """All ranks' code-use counts in `quantizer.counts` while the block runs (every rank must
    enter), this rank's own again afterwards. On resume rank 0 restores the sum and the others start
    from zero, so the next restart sees the same total as a run that never stopped."""
    if not ddp:
        yield
        return
    local = quantizer.counts.clone()
    dist.all_reduce(quantizer.counts)
    try:
        yield
    finally:
        quantizer.counts.copy_(local)


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def finish(model: nn.Module, world: int, master: bool, message: str, compare: bool = True) -> None:
    """End of a run: under DDP a check that every rank's weights stayed in step (`compare`; FSDP
    ranks hold different shards by design), then leave together and say `message` once."""
    if world > 1:
        if compare:
            digests = [None] * world
            dist.all_gather_object(digests, weights_digest(model))
            if master:
                print(f"weights identical across {world} ranks: {len(set(digests)) == 1}")
        dist.barrier()
    if master:
        print(message)
