"""
From sources to training: one sharded, resumable stream of batches, and stage 2's token cache.

A source (data.py) answers "give me clip number k". A `ClipStream` turns that into batches: the
global sample index of the j-th clip that rank r sees is k = start + j * world + r, so ranks never
see the same clip, and batch b of a rank goes to DataLoader worker b % workers, so the stream is the
same whatever the worker count. A resumed run starts at `start`, the number of clips all ranks
consumed before it stopped: it continues exactly where it stopped instead of repeating the data
order, and it neither repeats nor skips clips when it resumes on another number of ranks.

    source.load(k): video (T, H, W, 3) uint8  ->  batch {"video": (B, 3, T, H, W) float in [-1, 1],
                                                          "caption": [B str], "skipped": files skipped}

A clip that fails to load is skipped with one stderr line (once per failure, not once per epoch),
counted in the batch's "skipped", and a deterministic substitute takes its place, so the batch size
and the order stay fixed. 20 failed loads in a row raise UnusableData (counting the files that
failed): the data has nothing usable.

Stage 2 trains from a token cache: `build_token_cache` encodes the clips once with the frozen
tokenizer, each rank its share, into safetensors shards of codes (N, t, h, w) int16 with the
captions in the metadata; `load_token_cache` reads all shards back. A generator step then costs no
decoding. A shard is written atomically and carries a key naming what made it (tokenizer hash, data,
sizes): an interrupted build is redone, and a cache of other data or another tokenizer is rebuilt,
never read.
"""

import ast
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import IterableDataset, get_worker_info

from kit.config import TrainConfig
from kit.faults import TrainingStopped, UsageError
from media.folders import UnusableData
from media.folders import say_skipped
from kit.progress import Progress

# Legend: B batch, T frames, H W pixels, t h w latent grid, N clips, k global clip index, j clip
# index within one rank.


class ClipStream(IterableDataset):
    """Batches of clips from a source, sharded by rank and DataLoader worker (see the module
    docstring). Start after `start` clips (all ranks') to resume. A clip that fails to load is
    skipped with one stderr line and counted, and a deterministic substitute takes its place, so the
    batch size and the order stay fixed."""

    def __init__(self, source, batch_size: int, rank: int = 0, world: int = 1, start: int = 0,
                 max_batches: int | None = None):
        self.source = source
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.start = start
        self.max_batches = max_batches
        # per process; each DataLoader worker counts its own
        self.skipped = 0
        # the failures already reported: a bad file is named once, not every epoch
        self.said: set[str] = set()

    def clip(self, j: int) -> tuple[np.ndarray, str]:
        """Clip number j of this rank, with substitutes for files that fail to decode."""
        n = len(self.source)
        k = self.start + j * self.world + self.rank
        failed = set()
        for attempt in range(20):
            try:
                return self.source.load(k)
            except (OSError, ValueError, RuntimeError) as err:
                # PyAV's errors derive from these
                self.skipped += 1
                last = err
                # one message a file: what counts files, not retries of one
                failed.add(str(err))
                if str(err) not in self.said:
                    self.said.add(str(err))
                    say_skipped(f"clip {k} of {self.source.name}", err)
                k = int(np.random.default_rng([k, attempt, 7]).integers(n))
        last = " ".join(str(last).split())
        raise UnusableData(f"{self.source.name}: nothing loads ({len(failed)} file(s) failed, 20 tries in a row), "
                           f"the last with: {last}")

    def batch(self, b: int) -> dict:
        """{"video": (B, 3, T, H, W) in [-1, 1], "caption": [B str], "skipped": files skipped
        for it}."""
        before = self.skipped
        clips = [self.clip(j) for j in range(b * self.batch_size, (b + 1) * self.batch_size)]
        video = torch.from_numpy(np.stack([v for v, _ in clips]))  # (B, T, H, W, 3) uint8
        video = video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (B, 3, T, H, W) in [-1, 1]
        return {"video": video, "caption": [c for _, c in clips], "skipped": self.skipped - before}

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        b = worker
        end = math.inf if self.max_batches is None else self.max_batches
        while b < end:
            yield self.batch(b)
            b += workers


@torch.no_grad()
def encode_clips(tokenizer, source, clips: int, device: torch.device, batch_size: int = 32):
    """The first `clips` clips of a source through the tokenizer -> (codes (N, t, h, w), N captions,
    videos (N, 3, T, H, W) on the CPU)."""
    stream = ClipStream(source, batch_size)
    codes = []
    captions = []
    videos = []
    for b in range((clips + batch_size - 1) // batch_size):
        batch = stream.batch(b)
        codes.append(tokenizer.encode(batch["video"].to(device)))
        captions = captions + batch["caption"]
        videos = videos + [batch["video"]]
    return torch.cat(codes)[:clips], captions[:clips], torch.cat(videos)[:clips]


def held_out(read, master: bool = True):
    """read() the held-out clips, or None with one line when none of them loads: the run trains on,
    without the val_ figures (a folder whose held-out share is all broken files would otherwise
    stop here)."""
    try:
        return read()
    except UnusableData as err:
        if master:
            print(f"warning: {err}; training without val_ figures (name readable held-out data with --val-data)",
                  file=sys.stderr, flush=True)
        return None


# ----------------------------------------------------------------------------- the token cache

def cache_shard(folder: str, rank: int, world: int) -> str:
    return os.path.join(folder, f"tokens-{rank:03d}-of-{world:03d}.safetensors")


def build_token_cache(encode, source, clips: int, folder: str, batch_size: int, rank: int,
                      world: int, key: str, on_batch=None) -> None:
    """Encode this rank's share of `clips` clips with `encode` (video (B, 3, T, H, W) -> codes (B,
    t, h, w)) into one shard. `key` names what made the cache (tokenizer hash, data, sizes); a
    shard whose key differs is rebuilt. Written atomically, so an interrupted build is redone,
    never half-read."""
    path = cache_shard(folder, rank, world)
    if os.path.exists(path):
        try:
            with safe_open(path, framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return
        except (SafetensorError, OSError):
            # torn or emptied: the cache is ours to make again
            print(f"note: {path} is not readable; building it again", file=sys.stderr)
    os.makedirs(folder, exist_ok=True)
    stream = ClipStream(source, batch_size, rank, world)
    batches = math.ceil(clips / world / batch_size)
    codes = []
    captions = []
    for b in range(batches):
        batch = stream.batch(b)
        codes.append(encode(batch["video"]).to(torch.int16).cpu())  # (B, t, h, w)
        captions += batch["caption"]
        if on_batch is not None:
            on_batch(b + 1, batches)
    # this rank's clips k < clips: the last batch's extra ones go
    mine = len(range(rank, clips, world))
    meta = {"key": key, "captions": json.dumps(captions[:mine]), "skipped": str(stream.skipped)}
    try:
        save_file({"codes": torch.cat(codes)[:mine]}, path + ".tmp", metadata=meta)
    except (SafetensorError, OSError) as err:
        # a full disk: the run stops in one line, and the next one builds the cache again
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise TrainingStopped(f"could not write the token cache {path} ({err}); free some space "
                              "and run the command again") from None
    os.replace(path + ".tmp", path)


def load_token_cache(folder: str, world: int, key: str) -> tuple[torch.Tensor, list[str], int]:
    """All shards of a cache -> codes (N, t, h, w) long, N captions, and the files skipped
    building it."""
    codes = []
    captions = []
    skipped = 0
    for rank in range(world):
        path = cache_shard(folder, rank, world)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key:
                    raise UsageError(f"{path} was made by another tokenizer or data")
                codes.append(f.get_tensor("codes").long())
                captions += json.loads(meta["captions"])
                skipped += int(meta.get("skipped", 0))
        except (SafetensorError, OSError, ValueError, KeyError) as err:
            why = " ".join(str(err).split())[:80]
            raise UsageError(f"{path} is not a readable token cache ({why}): remove {folder} "
                             "and run again") from None
    return torch.cat(codes), captions, skipped


def file_stamp(entry) -> list[int]:
    """[size, modification time in ns] of the file an entry reads (a tar member: its shard); [] if
    it is gone."""
    path = entry[0] if isinstance(entry, tuple) else entry
    try:
        stat = os.stat(path)
    except OSError:
        return []
    return [stat.st_size, stat.st_mtime_ns]


def content_digest(source) -> str:
    """sha256 of what a source's clips and captions are made from, for stage 2's cache key: a
    world's module (its renderer, captions and settings: shapes.EDGES, the Animals story share), or
    a real data set's entries and their captions (captions.csv, label folders, tar .txt). An edit to
    any changes the key."""
    h = hashlib.sha256()
    if hasattr(source, "items"):
        # each file's size and modification time too: a video re-encoded under its old name makes
        # other codes than before
        stamped = [[str(entry), text, *file_stamp(entry)] for entry, text in source.items]
        h.update(json.dumps(stamped).encode("utf-8", "replace"))
    else:
        # the world's module, and the modules it draws with (animals.CODE_FILES: its sprites)
        module = sys.modules[type(source).__module__]
        for path in getattr(module, "CODE_FILES", (module.__file__,)):
            h.update(rendering_code(path))
    return h.hexdigest()


def rendering_code(path: str) -> bytes:
    """A world module's source less its top-level import statements: what renders the clips, not
    where the modules it draws with live, so that a cache outlives a move of the files."""
    with open(path, "rb") as f:
        source = f.read()
    lines = source.splitlines(keepends=True)
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for i in range(node.lineno - 1, node.end_lineno):
                lines[i] = b""
    return b"".join(lines)


def cache_codes(out: str, tokenizer: torch.nn.Module, digest: str, cfg: TrainConfig, source,
                rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, list[str], int]:
    """Every clip through the frozen encoder once, each rank its share -> (codes (N, t, h, w), N
    captions, files skipped). A cache made by the same tokenizer (`digest`), data (content_digest:
    the files and captions, or the world's code) and sizes is reused. A world gives cache_clips
    clips; real data a few windows per second of each file (data.CLIPS_PER_SECOND), at most that."""
    key = [digest, cfg.data, cfg.frames, cfg.image_size, cfg.fps, cfg.cache_clips, cfg.seed,
           content_digest(source)]
    clips = cfg.cache_clips
    if hasattr(source, "windows"):
        # real data (a world renders any clip): fixed windows; the key names the files' split and
        # the crop too
        source = source.windows(cfg.cache_clips)
        key = key + [cfg.val_data, cfg.crop, len(source)]
        clips = len(source)
    key = json.dumps(key)

    @torch.no_grad()
    def encode(video: torch.Tensor) -> torch.Tensor:  # (B, 3, T, H, W) -> (B, t, h, w)
        # fp32, as validation, story contexts and evaluation encode (under bf16, 0.4 to 0.75% of
        # the codes differ)
        return tokenizer.encode(video.to(device))

    # batches of 32 clips
    progress = Progress(math.ceil(clips / world / 32), "token cache batch")
    # one shard per rank
    folder = os.path.join(out, "token_cache")
    build_token_cache(encode, source, clips, folder, 32, rank, world, key,
                      on_batch=(lambda b, total: progress.update(b)) if rank == 0 else None)
    progress.close()
    if world > 1:
        # every rank's shard is written before any rank reads them all
        dist.barrier()
    # every rank holds the whole cache
    codes, captions, skipped = load_token_cache(folder, world, key)
    return codes, captions, skipped + getattr(source, "dropped", 0)
