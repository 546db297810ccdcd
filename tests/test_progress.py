import io
import time

from kit.progress import Progress, RunLog


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_a_plain_line_every_tenth_and_no_carriage_returns():
    pipe = io.StringIO()
    progress = Progress(240, "step", stream=pipe)
    for done in range(1, 241):
        progress.update(done, "loss 0.1")
    progress.close()
    lines = pipe.getvalue().splitlines()
    assert "\r" not in pipe.getvalue() and len(lines) == 10  # 10%, 20%, ..., 100%
    assert lines[-1].startswith("step 240/240 | loss 0.1 |") and lines[0].startswith("step 24/240")


def test_a_resumed_job_in_a_pipe_starts_at_its_own_tenth():
    pipe = io.StringIO()
    progress = Progress(100, "step", start=55, stream=pipe)
    for done in range(56, 101):
        progress.update(done)
    assert [line.split()[1] for line in pipe.getvalue().splitlines()] == ["60/100", "70/100", "80/100", "90/100", "100/100"]


def test_a_terminal_redraws_one_line_and_ends_it_on_close():
    term = Terminal()
    progress = Progress(5, "batch", stream=term)
    for done in range(1, 6):
        progress.update(done)
    progress.close()
    text = term.getvalue()
    assert text.count("\r") == 5 and text.count("\n") == 1 and text.endswith("\n")


def test_a_resumed_log_plots_the_whole_run_up_to_its_checkpoint(tmp_path):
    first = RunLog(str(tmp_path))
    for step in range(1, 6):  # steps 4 and 5 were logged after the checkpoint at 3, then the run was killed
        first.write({"step": step, "rec": 1.0 / step, "val_psnr": 20.0 + step})
    resumed = RunLog(str(tmp_path), start=3)
    assert [r["step"] for r in resumed.history] == [1, 2, 3]  # 4 and 5 run again, not twice
    resumed.write({"step": 4, "rec": 0.2})
    resumed.plot(("rec", "val_psnr"))
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert [r["step"] for r in RunLog(str(tmp_path)).history] == []  # a fresh run reads nothing back


def test_a_slow_job_in_a_pipe_also_gets_a_line_every_half_minute(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    pipe = io.StringIO()
    progress = Progress(1000, "step", stream=pipe)
    for done in range(1, 61):  # 6% of the work, 10 s a step: 600 s
        clock[0] += 10
        progress.update(done)
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 20 and lines[0].startswith("step 3/1000")  # one line per 30 s, before any tenth
