"""The README and docs/ stay true to the repository: the README stays short, every relative link
and image points at a file that exists (and every #anchor at a heading), and every command they
give for one of the repo's scripts parses with that script's own argparse parser.

A command is parsed, never run: argparse.ArgumentParser.parse_args is wrapped so that the script's
main() stops right after parsing, with the Namespace in a private exception. An unknown flag or a
bad choice makes argparse raise SystemExit(2), and the test fails naming the command. Placeholders
such as clip.mp4 or HOST are fine, since only the flags and their types are checked. A script whose
main() takes no argv (`python -m worlds`) gets the command through sys.argv instead. Nothing trains
or samples.
"""

import argparse
import functools
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_LINES = 300
MAX_BYTES = 20_000

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target), with an optional "title"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.M)
# a shell line that runs python or torchrun, first or after a `&&`
RUNS = re.compile(r"(^|&&\s*)(python|torchrun)\s")


def prose(text: str) -> str:
    """The page without its fenced blocks and inline code, where a [..](..) is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    words = re.sub(r"[^\w\- ]", "", heading.lower())
    return words.replace(" ", "-")


def links() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        for target in LINK.findall(prose(page.read_text())):
            if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not ours to check
                found.append((page, target))
    return found


def test_readme_is_short():
    text = README.read_text()
    assert text.count("\n") <= MAX_LINES, f"README.md has {text.count(chr(10))} lines"
    assert len(text.encode()) <= MAX_BYTES, f"README.md has {len(text.encode())} bytes"


def test_every_relative_link_points_at_a_file():
    found = links()
    missing = []
    for page, target in found:
        path = target.split("#")[0]
        if path and not (page.parent / path).exists():
            missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert found, "no links found: the pattern no longer matches"
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)


def test_every_anchor_names_a_heading():
    missing = []
    for page, target in links():
        path, _, anchor = target.partition("#")
        if not anchor:
            continue
        linked = page.parent / path if path else page
        if not linked.exists():
            continue  # the test above names it
        headings = HEADING.findall(prose(linked.read_text()))
        if anchor not in {slug(heading) for heading in headings}:
            missing.append(f"{page.relative_to(ROOT)}: {target}")
    assert not missing, "anchors that name no heading:\n" + "\n".join(missing)


def fenced_commands(page: Path) -> list[str]:
    """The shell lines of a page's fenced blocks: continuations joined, `$ ` prompts dropped."""
    commands = []
    for block in FENCE.findall(page.read_text()):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.split("\n")[1:-1]:
            line = line.strip().removeprefix("$ ")
            if RUNS.search(line):
                commands.append(line)
    return commands


def inline_commands(page: Path) -> list[str]:
    """The commands a page gives as inline code, in its prose or its tables (the gallery's).
    A span that names no script (`torchrun --nproc_per_node`) or elides with `...` is a mention."""
    commands = []
    for span in INLINE_CODE.findall(FENCE.sub("", page.read_text())):
        words = span.strip("`").split()
        names_a_script = any(word.endswith(".py") for word in words) or words[1:2] == ["-m"]
        if RUNS.match(" ".join(words)) and names_a_script and "..." not in words:
            commands.append(" ".join(words))
    return commands


def script_calls(command: str) -> list[tuple[str, list[str]]]:
    """Each (script's path from the root, argv) a command line runs: `&&` splits it; `python -m
    kit.fold` runs kit/fold.py, `python -m worlds` worlds/__main__.py; pip and python -c are left out;
    torchrun's own flags come before the script and are not the script's."""
    parts = [[]]
    for word in shlex.split(command, comments=True):
        if word == "&&":
            parts.append([])
        else:
            parts[-1].append(word)
    calls = []
    for part in parts:
        if part[:1] == ["python"] and len(part) > 1 and part[1].endswith(".py"):
            calls.append((part[1], part[2:]))
        elif part[:2] == ["python", "-m"] and len(part) > 2 and part[2] != "pytest":
            module = part[2].replace(".", "/")
            path = f"{module}.py" if (ROOT / f"{module}.py").exists() else f"{module}/__main__.py"
            calls.append((path, part[3:]))
        elif part[:1] == ["torchrun"]:
            scripts = [i for i, word in enumerate(part) if word.endswith(".py")]
            assert scripts, f"no script in {command!r}"
            calls.append((part[scripts[0]], part[scripts[0] + 1:]))
    return calls


COMMANDS = sorted({c for page in PAGES for c in fenced_commands(page) + inline_commands(page)})


def load_script(script: str):
    """The module of a script given by its path from the root: a top-level one as the repo imports
    it, one in a folder (a study kept in docs/) from its file."""
    if "/" not in script:
        return importlib.import_module(Path(script).stem)
    # named by its path, so that worlds/__main__.py is not run as __main__
    name = script[:-3].replace("/", "_").replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Parsed(Exception):
    """Raised in place of returning from parse_args: the script goes no further."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def test_the_readme_gives_commands_to_parse():
    """The extraction still finds the README's commands, so the test below is not vacuous."""
    scripts = set()
    for command in fenced_commands(README) + inline_commands(README):
        for script, _ in script_calls(command):
            scripts.add(script)
    assert {"train.py", "sample.py", "evaluate.py", "worlds/__main__.py"} <= scripts, scripts


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[:60])
def test_every_command_parses_with_its_script(command, monkeypatch, capsys):
    real_parse_args = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(real_parse_args(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    for script, argv in script_calls(command):
        assert (ROOT / script).exists(), f"{command!r} runs {script}, which is not here"
        main = load_script(script).main
        if inspect.signature(main).parameters:
            run = functools.partial(main, argv)
        else:
            monkeypatch.setattr(sys, "argv", [script, *argv])
            run = main
        try:
            run()
        except Parsed:
            continue
        except SystemExit as refusal:
            err = capsys.readouterr().err.strip().splitlines()
            pytest.fail(f"{script} refuses {command!r} (exit {refusal.code}): {err[-1:]}")
        pytest.fail(f"{script}'s main returned without parsing {command!r}")
