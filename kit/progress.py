"""
What a long job shows while it runs, and what a training run leaves behind to be read afterwards.

`Progress` is the one progress line of every long job: training steps, the token cache, the decoding
steps of sample.py. On a terminal it redraws itself in place (a carriage return, no newline) after
every unit of work; written to a log file or a pipe, where a carriage return would glue hundreds of
updates into one line, it prints a plain line each time another ~10% of the work is done or 30 s
have passed, and at the end. Each line says how far the job is, its own figures (losses, clips/s),
and the time left, which is extrapolated from the rate since the job (or its resume) started.

`RunLog` is a run's record in its --out folder:
  log.jsonl   one JSON object per logged step: step, lr, time, the losses, the skipped steps and files,
              and the validation figures when they were measured
  loss.png    the curves of chosen keys over all logged steps of the run, its earlier sessions included
              (losses on a log scale, PSNR on an axis of its own), drawn at every save and at the end
  <grid>.png  a grid of videos (B, 3, T, H, W), one clip a row, its frames left to right (samples.png:
              each row under its prompt)
A full disk must not end a training run: a line or a picture that cannot be written is reported on
stderr and the run goes on (the checkpoints say for themselves whether they were saved).

Legend: B batch, T frames, H W pixels.
"""

import json
import os
import sys
import time

import numpy as np
import torch


class Progress:
    """One line for `total` units of work named `label` (step, batch): `update(done, text)` after
    each unit; `start` is where a resumed job begins."""

    def __init__(self, total: int, label: str, start: int = 0, stream=None, every: float = 30.0):
        self.total = total
        self.label = label
        self.start = start
        self.t0 = time.time()
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        # the last tenth reported in a pipe
        self.decile = (10 * start) // max(total, 1)
        # in a pipe, a line at least every `every` seconds too
        self.every = every
        self.last = self.t0
        # a terminal line is open and needs a newline before other output
        self.drawn = False

    def elapsed(self) -> float:
        return time.time() - self.t0

    def update(self, done: int, text: str = "") -> None:
        decile = (10 * done) // max(self.total, 1)
        now = time.time()
        if not self.tty and decile == self.decile and done < self.total and now - self.last < self.every:
            return
        self.decile = decile
        self.last = now
        left = (self.total - done) * self.elapsed() / max(done - self.start, 1)
        line = f"{self.label} {done}/{self.total}{' | ' + text if text else ''} | {int(left) // 60}m{int(left) % 60:02d}s left"
        if self.tty:
            # clear what a longer previous line left behind
            self.stream.write("\r" + line + "\033[K")
            self.drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the redrawn line, so that what is printed next starts on a line of its own."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def logged(line: str) -> list[dict]:
    """The record of one log.jsonl line, as a list of one; none for a blank line, or for one torn by
    a process killed mid-write (or a full disk), whose step is lost with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return []
    return [record] if isinstance(record, dict) and isinstance(record.get("step"), int) else []


class RunLog:
    """log.jsonl, loss.png and sample grids in a run's folder; `history` holds the records so far,
    those of the run's earlier sessions too (up to `start`, the step a resumed run continues from)."""

    def __init__(self, out: str, start: int = 0):
        self.out = out
        self.history = []
        path = os.path.join(out, "log.jsonl")
        if start and os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            records = []
            for line in text.splitlines():
                records += logged(line)
            if text and not text.endswith("\n"):
                # a torn last line ends here, so that the next record starts a line of its own
                with open(path, "a") as f:
                    f.write("\n")
            # a killed session may have logged past
            latest = {r["step"]: r for r in records if r["step"] <= start}
            # its checkpoint: those steps run again
            self.history = [latest[k] for k in sorted(latest)]

    def write(self, record: dict) -> None:
        self.history.append(record)
        try:
            with open(os.path.join(self.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            print(f"warning: log line of step {record['step']} not written ({err.strerror})",
                  file=sys.stderr)

    def plot(self, keys: tuple[str, ...]) -> None:
        """loss.png: the curves of `keys` over the whole run, losses on a log scale, PSNR on an axis
        of its own."""
        import matplotlib
        # files only, no window
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        right = None
        for key in keys:
            points = [(h["step"], h[key]) for h in self.history if key in h]
            if not points:
                continue
            if "psnr" in key:
                right = right or ax.twinx()
                right.plot(*zip(*points), "k.-", label=key)
                right.set_ylabel("dB")
            else:
                ax.plot(*zip(*points), label=key)
        ax.set_yscale("log"), ax.set_xlabel("step"), ax.legend(loc="upper center")
        if right is not None:
            right.legend(loc="upper right")
        try:
            fig.savefig(os.path.join(self.out, "loss.png"), dpi=100, bbox_inches="tight")
        except OSError as err:
            print(f"warning: loss.png not written ({err.strerror})", file=sys.stderr)
        finally:
            plt.close(fig)

    def grid(self, videos: torch.Tensor, name: str, labels: list[str] | None = None) -> None:
        """`name`: videos (B, 3, T, H, W) as a grid of frames, one clip a row (each under its label,
        if given)."""
        try:
            write_grid(os.path.join(self.out, name), videos, labels)
        except OSError as err:
            print(f"warning: {name} not written ({err.strerror})", file=sys.stderr)


def write_grid(path: str, videos: torch.Tensor, labels: list[str] | None = None) -> None:
    """A PNG of videos (B, 3, T, H, W) in [-1, 1], one clip a row, frames left to right; with
    `labels`, each row under its caption, drawn by matplotlib with the frames enlarged so that the
    text stays small."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # (B, H, T*W, 3)
    rows = ((videos.clamp(-1, 1) + 1) / 2).permute(0, 3, 2, 4, 1).flatten(2, 3).float().cpu().numpy()
    if labels is None:
        plt.imsave(path, np.concatenate(list(rows)))  # (B*H, T*W, 3)
        return
    B, H, W = rows.shape[:3]
    # a 64-pixel row is drawn 256 pixels high, the caption readable above it
    scale = max(1, 300 // H)
    fig, axes = plt.subplots(B, 1, figsize=(W * scale / 100, B * (H * scale + 40) / 100), dpi=100,
                             squeeze=False)
    for ax, row, label in zip(axes[:, 0], rows, labels):
        ax.imshow(row, interpolation="nearest"), ax.set_axis_off()
        ax.set_title(label[:120], fontsize=11, loc="left")
    try:
        fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)
