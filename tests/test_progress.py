import io

from progress import Progress


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
