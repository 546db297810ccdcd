"""
What a folder of real data holds: its files and their captions, read before anything is decoded.

Captions come from the folder's captions.csv (`path,caption` rows, paths relative to the folder, so
`../other/clip.mp4` names a file elsewhere), else from label sub-folders (root/label/clip.mp4 gives
"a video of label", the Moments in Time layout), else they are empty. The csv is read one row a
line: a caption that opens a quote and never closes it ends with its line, and the rows after it
stay rows. A caption is cut to CAPTION_CHARS characters; bytes that are not UTF-8 become U+FFFD,
in a captions.csv and in a label folder's name alike. Tar shards are named by a brace pattern
(`shard-{000..099}.tar`, expand_braces), which may name at most MAX_NAMES files.

A file that cannot be used is said on one stderr line (`say_skipped`) and left out; a folder with
nothing usable raises UnusableData, which the scripts turn into one line and exit code 2. data.py
builds its sources on these lists.
"""

import csv
import os
import re
import sys
from pathlib import Path

from media.video import VIDEO_EXTS


class UnusableData(ValueError):
    """The data set has nothing to train on: no files, or only files that fail to load. One line."""


# the most names a brace pattern may expand to: 'x-{0..99999999999}.tar' would fill memory with
# names before one is looked for
MAX_NAMES = 1_000_000


def expand_braces(pattern: str) -> list[str]:
    """'shard-{000..002}.tar' -> ['shard-000.tar', 'shard-001.tar', 'shard-002.tar']; '{a,b}' too.
    UnusableData past MAX_NAMES names, before they are listed."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    too_many = UnusableData(f"{pattern[:200]} names more than {MAX_NAMES} files (MAX_NAMES)")
    lo, hi, options = match.groups()
    if options is None:
        # a range's length from its digits first: int() of 5000 of them is refused
        if len(hi) > len(str(MAX_NAMES)) or int(hi) - int(lo) >= MAX_NAMES:
            raise too_many
        # a numeric range keeps the zero padding of its lower end
        options = ",".join(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    head = pattern[:match.start()]
    tail = pattern[match.end():]
    expanded = []
    for option in options.split(","):
        expanded += expand_braces(head + option + tail)
        if len(expanded) > MAX_NAMES:
            raise too_many
    return expanded


def say_skipped(what: str, why: object) -> None:
    """One stderr line for one skipped file (warnings.warn prints two; FFmpeg messages may
    hold newlines)."""
    print(f"skipped {what}: {' '.join(str(why).split())}", file=sys.stderr, flush=True)


# a caption is cut to this many characters wherever it comes from
CAPTION_CHARS = 1000


def caption_table(root: Path) -> Path | None:
    """A folder's captions.csv (Captions.csv too), or None."""
    if not root.is_dir():
        return None
    tables = [p for p in root.glob("*") if p.name.lower() == "captions.csv" and p.is_file()]
    return tables[0] if tables else None


def table_rows(root: Path, table: Path) -> list[list[str]]:
    """The `path,caption` rows of a captions.csv, one row a line: a quote opened and never closed is
    read to the end of its line (and said), never across the rows after it. A header row is dropped."""
    # lift the csv module's 128 KiB field limit (process-wide), so a huge caption is cut, not fatal
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))
    with open(table, newline="", encoding="utf-8-sig", errors="replace") as f:
        lines = f.read().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = next(csv.reader([line], strict=True), [])
        except csv.Error:
            print(f"note: line {number} of {table} opens a quote it does not close; "
                  "read to the end of its line", file=sys.stderr)
            row = next(csv.reader([line]), [])
        if row:
            rows.append(row)
    if rows and not Path(rows[0][0]).suffix and not (root / rows[0][0]).is_file():
        # a header (path,caption or file,text) names no file with an extension
        rows = rows[1:]
    return rows


def readable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (which Python keeps as lone surrogates, and the
    caption BPE cannot encode) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def folder_items(root: Path, exts: tuple[str, ...]) -> tuple[list[tuple[Path, str]], int, str]:
    """(file, caption) pairs of a folder, the number of captions.csv rows dropped, and the layout:
    root/captions.csv (`path,caption` rows, paths relative to root) if there is one, else `a video
    of {label}` from each file's sub-folder, else "". Captions are cut to CAPTION_CHARS characters;
    bytes that are not UTF-8 become U+FFFD."""
    table = caption_table(root)
    if table is None:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file())
        if not files:
            why = f"no {' '.join(exts)} files in it" if root.is_dir() else "no such folder"
            raise UnusableData(f"no videos found in {root}: {why}")
        labels = []
        for p in files:
            labels.append(re.sub("[_-]", " ", readable(p.parent.name)) if p.parent != root else "")
        layout = "label folders" if any(labels) else "no captions.csv, no label folders"
        captioned = [(p, f"a video of {label}" if label else "") for p, label in zip(files, labels)]
        return captioned, 0, layout
    rows = table_rows(root, table)
    found = []
    for row in rows:
        if os.path.isfile(root / row[0]):
            # False for a name too long or with a NUL byte, too everything after the first comma is
            # the caption: people write captions with commas, unquoted
            found.append((root / row[0], ",".join(row[1:]).strip()[:CAPTION_CHARS]))
        else:
            say_skipped(f"row {row[0][:200]!r} of {table}", "no such file")
    if not found:
        raise UnusableData(f"no videos found in {root}: none of the {len(rows)} files named in {table} exists")
    return found, len(rows) - len(found), table.name


def holds_videos(root: Path) -> bool:
    """Whether a folder is a video data set: a video file in it, or one named by its captions.csv
    (whose rows may name files elsewhere, as ../other/clip.mp4)."""
    if any(p.suffix.lower() in VIDEO_EXTS for p in root.rglob("*")):
        return True
    table = caption_table(root)
    if table is None:
        return False
    return any(Path(row[0]).suffix.lower() in VIDEO_EXTS for row in table_rows(root, table))
