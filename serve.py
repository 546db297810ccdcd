"""
Try Phenaki in a browser: a page on this machine that turns a prompt into a video, and several into
a story, and draws each window's frames the moment the sampler has them.

    python serve.py                          # http://127.0.0.1:8000/, both worlds' shipped pairs
    python serve.py --world shapes --port 8080
    python serve.py --host 0.0.0.0           # other machines may use it too: nothing guards it

The server (the standard library's http.server, a thread a connection) loads a pair once and
answers:

    GET  /                  the page, web/index.html: plain HTML, CSS and JavaScript, nothing
                            fetched from elsewhere
    GET  /defaults          the sampler's defaults, the worlds, the limits and the examples, as JSON
    POST /generate          {"prompts": [...], "world", "frames", "seed", "cfg", "steps", "scale"}
                            -> a stream of JSON lines, one event a line, while the video is made
    GET  /video/<id>.mp4    a finished video (or .gif), by the id its stream ended with

The stream says {"queued": place} while jobs ahead of it run, {"plan": ...} when it starts,
{"step": n} after each decoding step, {"frames": [...]} with each window's new frames (T, H, W, 3)
as base64 RGB bytes, which the page draws at once, and {"done": ...} or {"error": ...} last. The
frames are maskgit.stream_video's, the sampler of sample.py with its seed, defaults and frame rules
(config.frame_shares), so a request gives the frames `python sample.py` gives for the same prompts;
they go into an .mp4 and a .gif through video.py's writer as they come.

One job runs at a time: there is one model, and two jobs on two cores would each take twice as
long. Later requests wait in line, told their place every second, up to MAX_WAITING; more are
refused (503). A page that goes away (a tab closed, Stop pressed) fails the next line written to
it, and that ends its job between two decoding steps and lets the next one in. A bad request gets
a 4xx and one line, which the page shows. No request names a file: the videos live in a temporary
folder the server makes, under random ids it keeps, and the folder is removed when it stops.
"""

import argparse
import base64
import contextlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from kit.checkpoint import DEFAULT_WORLD, SHIPPED_WORLDS, load_generator, shipped
from kit.config import HelpWithDefaults, check_sampling, frame_shares, keep_at_cut
from kit.distributed import check_device
from kit.faults import UsageError, exit_usage
from media.video import VideoWriter, scaled_frames
from maskgit import CFG, STEPS, TEMPERATURE, MaskGIT, plan_windows, stream_video, window_steps
from text_encoder import CaptionTokenizer

# Legend: T frames, H W pixels, t latent frames.

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "index.html")
# the text encoder reads a caption's first 31 tokens, far fewer than this many characters
MAX_PROMPT = 200
# story segments in one request
MAX_PROMPTS = 10
# the longest video: the length of the evaluation's long videos, a few minutes on two cores
MAX_FRAMES = 241
# zoom of the downloads, sample.py's --scale bound
MAX_SCALE = 16
# the largest request body read: a request is a few hundred bytes
MAX_BODY = 64 * 1024
# requests waiting behind the running one; the next is refused
MAX_WAITING = 8
# finished videos kept for download; older ones are removed from the folder
KEEP_VIDEOS = 32
# the README's gallery, for the page's example buttons
EXAMPLES = [
    ("animals", ["a dog running"]),
    ("animals", ["a black cat sitting in the snow"]),
    ("animals", ["a bird flying at night"]),
    ("animals", ["a dog running on the grass", "the dog jumps", "the dog sits down"]),
    ("shapes", ["a red circle moving right"]),
    ("shapes", ["a large yellow square moving down", "a large yellow square moving left"]),
]
# what a request may ask for
FIELDS = ("prompts", "world", "frames", "seed", "cfg", "steps", "scale")


class Refused(Exception):
    """A request the server will not run: an HTTP status and one line for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Pair(NamedTuple):
    """A loaded generator, its caption tokenizer and video tokenizer, as sample.py loads them."""
    model: MaskGIT
    text: CaptionTokenizer
    tokenizer: nn.Module
    fps: float
    # latent frames a story keeps at a cut, as its world taught (maskgit.plan_windows)
    cut: int | None


class Request(NamedTuple):
    """A checked request: what the page's form asks for."""
    prompts: list[str]
    world: str
    # None: one window, and a window less its first frame for each further prompt (sample.py)
    frames: int | None
    seed: int
    cfg: float
    steps: int
    scale: int


def load_pair(generator: str, tokenizer: str, device: torch.device) -> Pair:
    model, text, tok, meta = load_generator(generator, tokenizer)
    cfg = json.loads(meta.get("train_config", "{}"))
    return Pair(model.to(device), text, tok.to(device), cfg.get("fps", 8.0), keep_at_cut(cfg))


def whole(body: dict, key: str, default: int | None) -> int | None:
    """The request's `key`, which must be a whole number where it is given."""
    value = body.get(key, default)
    # JSON's true is a Python int too
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(f"{key} must be a whole number, got {json.dumps(value)[:40]}")
    return value


def check_request(raw: bytes, worlds: list[str]) -> Request:
    """A request's body -> Request, or UsageError naming the first thing wrong with it."""
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise UsageError(f"the request is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise UsageError("the request must be a JSON object of " + ", ".join(FIELDS))
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise UsageError(f"unknown field {unknown[0]!r}: a request may give " + ", ".join(FIELDS))
    prompts = body.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise UsageError("prompts must be a list of texts, one a story segment")
    if not 1 <= len(prompts) <= MAX_PROMPTS:
        raise UsageError(f"give 1 to {MAX_PROMPTS} prompts, got {len(prompts)}")
    for i, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            raise UsageError(f"prompt {i} is empty; say what the video should show")
        if len(prompt) > MAX_PROMPT:
            raise UsageError(f"prompt {i} has {len(prompt)} characters; at most {MAX_PROMPT}")
    world = body.get("world", worlds[0])
    if world not in worlds:
        raise UsageError(f"world must be one of {', '.join(worlds)}, got {json.dumps(world)[:40]}")
    frames = whole(body, "frames", None)
    if frames is not None and not (1 <= frames <= MAX_FRAMES and frames % 2):
        raise UsageError(f"frames must be 1 + 2n (the first frame, then pairs) in 1 to "
                         f"{MAX_FRAMES}, got {frames}")
    scale = whole(body, "scale", 4)
    if not 1 <= scale <= MAX_SCALE:
        raise UsageError(f"scale must lie in 1 to {MAX_SCALE}, got {scale}")
    cfg = body.get("cfg", CFG)
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)):
        raise UsageError(f"cfg (guidance) must be a number, got {json.dumps(cfg)[:40]}")
    seed = whole(body, "seed", 0)
    steps = whole(body, "steps", STEPS)
    # sample.py's ranges, in its words (json.loads reads NaN and Infinity too)
    check_sampling(steps, cfg, TEMPERATURE, seed)
    return Request([p.strip() for p in prompts], world, frames, seed, float(cfg), steps, scale)


class Line:
    """The jobs in order of arrival: the first runs, the rest wait their turn."""

    def __init__(self):
        self.jobs = []
        self.changed = threading.Condition()

    def join(self) -> object:
        with self.changed:
            if len(self.jobs) > MAX_WAITING:
                raise Refused(503, f"busy: {len(self.jobs)} videos are being made or waiting; "
                                   "try again in a minute")
            ticket = object()
            self.jobs.append(ticket)
            return ticket

    def ahead(self, ticket: object, wait: float) -> int:
        """How many jobs are ahead of `ticket`, once that is none or `wait` seconds have passed."""
        with self.changed:
            if self.jobs.index(ticket):
                self.changed.wait(wait)
            return self.jobs.index(ticket)

    def leave(self, ticket: object) -> None:
        with self.changed:
            self.jobs.remove(ticket)
            self.changed.notify_all()

    @contextlib.contextmanager
    def turn(self, ticket: object, send: Callable[[dict], None]):
        """Wait for `ticket`'s turn, telling the page its place each second; leave the line after
        the job, however it ends (a page that goes away fails `send`)."""
        try:
            ahead = self.ahead(ticket, 0)
            while ahead:
                send({"queued": ahead})
                ahead = self.ahead(ticket, 1.0)
            yield
        finally:
            self.leave(ticket)


class Server(ThreadingHTTPServer):
    """The http.server that holds what its requests share: the pairs on offer (loaded on first use),
    the line of jobs, and the folder of finished videos, removed by server_close."""
    daemon_threads = True

    def __init__(self, address: tuple[str, int], pairs: dict[str, tuple[str, str]],
                 device: torch.device):
        self.offered = pairs
        self.device = device
        self.loaded = {}
        # guards `loaded` and `videos`
        self.lock = threading.Lock()
        self.line = Line()
        with open(PAGE, "rb") as f:
            self.page = f.read()
        # made before the socket is bound: a failed bind calls server_close, which removes it
        self.folder = tempfile.mkdtemp(prefix="phenaki-serve-")
        # video id -> its files, oldest first
        self.videos = {}
        super().__init__(address, Handler)

    def pair(self, world: str) -> Pair:
        with self.lock:
            if world not in self.loaded:
                self.loaded[world] = load_pair(*self.offered[world], self.device)
            return self.loaded[world]

    def defaults(self) -> dict:
        return {"worlds": list(self.offered), "seed": 0, "cfg": CFG, "steps": STEPS, "scale": 4,
                "max_prompts": MAX_PROMPTS, "max_prompt": MAX_PROMPT, "max_frames": MAX_FRAMES,
                "examples": [{"world": w, "prompts": p} for w, p in EXAMPLES if w in self.offered]}

    def make(self, request: Request, pair: Pair, shares: list[int],
             send: Callable[[dict], None]) -> None:
        """Sample the video a window at a time (maskgit.stream_video), sending each window's frames
        as they come and writing them to an .mp4 and a .gif; the last line names the files."""
        t = pair.model.config.latent_frames
        # a window given k = (context + 1) / 2 latent frames decodes fewer steps (window_steps)
        total = 0
        windows = 0
        for _, context, _ in plan_windows(t, None, shares, 0, pair.cut):
            total += window_steps(request.steps, t - (context + 1) // 2, t)
            windows += 1
        send({"plan": {"windows": windows, "frames": sum(shares), "segments": shares,
                       "steps": total, "fps": pair.fps}})
        max_len = pair.model.config.text.max_len
        prompts = []
        for prompt in request.prompts:
            ids, mask = pair.text.encode([prompt], max_len)  # (1, L) each
            prompts.append((ids.to(self.device), mask.to(self.device)))
        steps = itertools.count(1)
        video = secrets.token_hex(8)
        paths = {ext: os.path.join(self.folder, f"{video}.{ext}") for ext in ("mp4", "gif")}
        generator = torch.Generator(self.device).manual_seed(request.seed)
        t0 = time.time()
        with VideoWriter(paths["mp4"], pair.fps) as mp4, VideoWriter(paths["gif"], pair.fps) as gif:
            for piece in stream_video(pair.model, pair.tokenizer, prompts, shares,
                                      keep_at_cut=pair.cut, steps=request.steps, cfg=request.cfg,
                                      on_step=lambda *_: send({"step": next(steps)}),
                                      generator=generator):
                # (new, H, W, 3) uint8, drawn by the page at its own zoom
                frames = scaled_frames(piece[0])
                send({"frames": [base64.b64encode(f.tobytes()).decode() for f in frames],
                      "size": frames.shape[1:3]})
                big = scaled_frames(piece[0], request.scale)  # (new, scale H, scale W, 3)
                mp4.write(big)
                gif.write(big)
        self.keep(video, paths)
        send({"done": {"video": video, "frames": sum(shares), "seconds": time.time() - t0}})

    def keep(self, video: str, paths: dict[str, str]) -> None:
        with self.lock:
            self.videos[video] = paths
            while len(self.videos) > KEEP_VIDEOS:
                oldest = next(iter(self.videos))
                for path in self.videos.pop(oldest).values():
                    os.remove(path)

    def server_close(self) -> None:
        super().server_close()
        shutil.rmtree(self.folder, ignore_errors=True)


class Handler(BaseHTTPRequestHandler):
    """One connection's requests: the page, its defaults, a video, or a job."""
    server: Server
    # seconds a socket may stall: a page that stops reading (a laptop asleep) is gone, and its job
    # must not hold the model until the connection dies
    timeout = 60

    def reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def refuse(self, status: int, message: str) -> None:
        self.log_message("refused (%d): %s", status, message)
        self.reply(status, json.dumps({"error": message}).encode(), "application/json")

    def do_GET(self) -> None:
        found = re.fullmatch(r"/video/([0-9a-f]{16})\.(mp4|gif)", self.path)
        if self.path == "/":
            self.reply(200, self.server.page, "text/html; charset=utf-8")
        elif self.path == "/defaults":
            self.reply(200, json.dumps(self.server.defaults()).encode(), "application/json")
        elif found:
            self.send_video(found[1], found[2])
        else:
            self.refuse(404, f"nothing at {self.path[:100]}: the page is at /")

    def send_video(self, video: str, ext: str) -> None:
        try:
            with open(self.server.videos[video][ext], "rb") as f:
                data = f.read()
        except (KeyError, FileNotFoundError):
            # never made, or removed for a newer one
            return self.refuse(404, f"no video {video}: the server keeps the last {KEEP_VIDEOS}")
        self.reply(200, data, "video/mp4" if ext == "mp4" else "image/gif")

    def do_POST(self) -> None:
        if self.path != "/generate":
            return self.refuse(404, f"nothing to post to at {self.path[:100]}: POST /generate")
        try:
            request, pair, shares = self.read_request()
            ticket = self.server.line.join()
        except UsageError as err:
            return self.refuse(400, str(err))
        except Refused as err:
            return self.refuse(err.status, str(err))
        except TimeoutError:
            return self.log_message("the request's body never came")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            with self.server.line.turn(ticket, self.send_line):
                self.server.make(request, pair, shares, self.send_line)
        except (ConnectionError, TimeoutError):
            self.log_message("the page went away: its job is cancelled")
        except Exception as err:
            # the page gets one line; the traceback goes to the server's terminal
            self.send_line({"error": f"the sampler failed: {err}"})
            raise

    def read_request(self) -> tuple[Request, Pair, list[int]]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise Refused(411, "send the request with a Content-Length")
        if int(length) > MAX_BODY:
            raise Refused(413, f"the request has {length} bytes; at most {MAX_BODY}")
        request = check_request(self.rfile.read(int(length)), list(self.server.offered))
        pair = self.server.pair(request.world)
        # one window, and a window less its first frame for each further prompt (sample.py)
        window = 1 + 2 * (pair.model.config.latent_frames - 1)
        frames = request.frames or 1 + (window - 1) * len(request.prompts)
        if frames > MAX_FRAMES:
            raise UsageError(f"{len(request.prompts)} prompts make {frames} frames; "
                             f"at most {MAX_FRAMES}: give frames")
        shares = frame_shares(frames, len(request.prompts))
        return request, pair, shares

    def send_line(self, event: dict) -> None:
        self.wfile.write(json.dumps(event).encode() + b"\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="A page that makes videos with Phenaki as you watch.",
                                formatter_class=HelpWithDefaults)
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on; 0.0.0.0 lets other machines in")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free one")
    p.add_argument("--world", default=DEFAULT_WORLD, choices=SHIPPED_WORLDS,
                   help="the world the page starts with; with a given checkpoint, whose shipped "
                        "file stands in for the one not given")
    p.add_argument("--checkpoint", help="a stage-2 generator (default: each world's shipped one)")
    p.add_argument("--tokenizer-checkpoint",
                   help="the stage-1 tokenizer it was trained on (default: the world's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    # the worlds' shipped pairs, the asked world's first; or the given pair alone
    pairs = {w: (shipped(w, "generator"), shipped(w, "tokenizer"))
             for w in sorted(SHIPPED_WORLDS, key=lambda w: w != args.world)}
    if args.checkpoint or args.tokenizer_checkpoint:
        pairs = {"given": (args.checkpoint or pairs[args.world][0],
                           args.tokenizer_checkpoint or pairs[args.world][1])}
    try:
        if not 0 <= args.port < 65536:
            raise UsageError(f"--port must lie in 0 to 65535, got {args.port}")
        server = Server((args.host, args.port), pairs, check_device(args.device))
    except (UsageError, ValueError) as err:
        exit_usage(err)
    except OSError as err:
        exit_usage(UsageError(f"cannot listen on {args.host}:{args.port}: {err.strerror}"))
    try:
        # loaded before the address is given: a bad checkpoint is one line, exit code 2
        server.pair(next(iter(pairs)))
    except (UsageError, ValueError) as err:
        server.server_close()
        exit_usage(err)
    host, port = server.server_address[:2]
    print(f"serving: http://{host}:{port}/  (Ctrl-C stops it)", flush=True)
    print(f"videos: {server.folder} (removed at exit)", flush=True)
    # a plain kill stops it as Ctrl-C does, so the folder is removed
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
