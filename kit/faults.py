"""
What keeps a long training run alive, and how it ends when it cannot go on. Each fault is tested in
tests/test_faults.py; train.py's loops show all of this as a `StepGuard` and two calls.

- A non-finite step: a loss or gradient norm that is inf or NaN on any rank skips that step's update
  on every rank (the step still counts, so the next batch differs). Ten in a row stop the run with
  one line (`TrainingStopped`, exit code 1): the learning rate is too high for this model and data.
- SIGTERM (a scheduler's preemption) or Ctrl-C on any rank: the step in flight finishes, the loop
  saves a checkpoint, and every rank leaves with 128 + the signal (143, 130). A second Ctrl-C leaves
  at once. The signal is noticed in the same all-reduce as the non-finite check, so all ranks stop
  at the same step and the checkpoint is whole.
- DataLoader workers leave the process group (`quiet_worker`): a Ctrl-C or a SIGTERM sent to the
  group then reaches the main process alone, which saves and stops the workers itself.
- Exit codes: 0 done, 1 the run failed (`TrainingStopped`), 2 a mistake in the command or the data
  (`UsageError`, `UnusableData`), 128 + N stopped by signal N. `exit_code` turns an exception that
  ended a run into its code and its one line on stderr; a Ctrl-C before the guard is on (while
  stage 2 builds its token cache) is one line and 130.
- A script that writes a file as it goes (sample.py) leaves on SIGTERM as on Ctrl-C
  (`signals_unwind`): by SystemExit, through the with-blocks that remove its unfinished `.part`.

What is not here: a full disk during a save (runs.save_run keeps the previous checkpoint and the run
goes on), a SIGKILL (--resume continues from the last checkpoint: checkpoint.py writes atomically),
a worker that dies under torchrun (distributed.process_group_store lets the restarted group meet).
"""

import contextlib
import math
import os
import signal
import sys

import torch
import torch.distributed as dist

from media.folders import UnusableData

# the exit codes of a run that failed and of a mistake in the command line or the input
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


def exit_usage(err: Exception) -> None:
    """Leave a script after a mistake in its command line or input: one line on stderr, no
    traceback."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


class TrainingStopped(Exception):
    """The run cannot go on (e.g. the loss diverged): reported as one line, exit code 1."""


class StepGuard:
    """What every step checks on all ranks at once, in one all-reduce: a non-finite loss or gradient
    norm, and a signal on any rank. Use as a context manager: it installs the signal handlers."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bad_in_a_row = 0
        self.skipped = 0
        self.stop = False
        # signalled: the first signal's number
        self.signalled = 0
        self.previous = {}

    def __enter__(self) -> "StepGuard":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self.on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def on_signal(self, signum: int, frame) -> None:
        if self.signalled and signum == signal.SIGINT:
            # a second Ctrl-C: leave now
            raise KeyboardInterrupt
        self.signalled = self.signalled or signum

    def step_is_finite(self, loss: float, grad_norm: float) -> bool:
        """Are this step's loss and gradient norm finite on every rank? Also sets `stop` if any rank
        was signalled. Ten non-finite steps in a row raise TrainingStopped."""
        bad_here = not (math.isfinite(loss) and math.isfinite(grad_norm))
        flags = torch.tensor([float(bad_here), float(self.signalled > 0)], device=self.device)
        if dist.is_initialized():
            # one collective for both questions
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad = bool(flags[0])
        self.stop = bool(flags[1])
        self.bad_in_a_row = self.bad_in_a_row + 1 if bad else 0
        self.skipped += bad
        if self.bad_in_a_row >= 10:
            raise TrainingStopped("the loss was not finite 10 steps in a row; lower the learning rate "
                                  "and continue with --resume from the last checkpoint")
        return not bad

    def leave_if_signalled(self, step: int, world: int, master: bool, out: str) -> None:
        """After SIGTERM or Ctrl-C, once this step's checkpoint is saved: leave together, with 128 +
        the signal (a rank that was not signalled itself says SIGTERM)."""
        if not self.stop:
            return
        if world > 1:
            dist.barrier()
        if master:
            print(f"\nstopped by a signal at step {step}; checkpoint saved in {out}: continue with --resume", flush=True)
        sys.exit(128 + (self.signalled or signal.SIGTERM))


@contextlib.contextmanager
def signals_unwind():
    """Within: SIGTERM and Ctrl-C leave by SystemExit(128 + the signal), which unwinds the with-blocks
    on the way, so a script that writes a file (sample.py) removes its `.part` under either signal."""
    def unwind(signum: int, frame) -> None:
        print(f"\nstopped by signal {signum}; unfinished files removed", file=sys.stderr)
        sys.exit(128 + signum)
    previous = {sig: signal.signal(sig, unwind) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def quiet_worker(worker: int) -> None:
    """DataLoader workers leave the process group, so that Ctrl-C or a SIGTERM sent to the group (as
    schedulers do) reaches only the main process, which saves and then stops them itself."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()


def exit_code(err: BaseException) -> int:
    """The exit code of a run that ended by `err`, its one line said on stderr."""
    if isinstance(err, SystemExit):
        # leave_if_signalled
        return err.code
    if isinstance(err, KeyboardInterrupt):
        # Ctrl-C before the guard is on (while the token cache is built), or a second one
        print("\nstopped by Ctrl-C; what was saved stays, and --resume goes on from it",
              file=sys.stderr)
        return 128 + signal.SIGINT
    if isinstance(err, (UsageError, UnusableData)):
        # a --resume with nothing readable; data with nothing usable raised in a DataLoader worker,
        # the message carries the worker's traceback: its last line is the error
        print(f"error: {str(err).strip().splitlines()[-1].removeprefix(f'{UnusableData.__module__}.UnusableData: ')}",
              file=sys.stderr)
        return EXIT_USAGE
    # TrainingStopped
    print(f"error: {err}", file=sys.stderr)
    return EXIT_FAILED
