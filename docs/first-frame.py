"""
How soon the browser page (serve.py) shows a video, beside sample.py on the same machine (issue 47).

    python docs/first-frame.py                       # 3 rounds, "a dog running", the Animals pair
    python docs/first-frame.py --rounds 5 --prompt "a bird flying at night"

Each round measures, one after the other:
- sample.py: `python sample.py PROMPT --out <temporary>.mp4` from its launch to its exit, when the
  .mp4 is in place (one window of 11 frames, written as a whole).
- the page, cold: from launching `python serve.py` to the first frame drawn on the page and to the
  finished video, with the browser already open (headless Chromium, driven as tests/test_serve.py
  drives it): the page loaded once the server prints its address, the prompt typed, Generate
  pressed.
- the page, warm: the same server and page asked again, from pressing Generate (the page's own
  figures, which its progress line shows too).
The medians close the output. The rounds share the machine with whatever else runs on it: on a
shared CPU the figures move with the load, so compare them within one run.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.test_serve import Browser  # noqa: E402


def sample_seconds(prompt: str, out: str) -> float:
    """sample.py from its launch to its exit, when its .mp4 is written."""
    started = time.time()
    subprocess.run([sys.executable, "sample.py", prompt, "--out", out], cwd=ROOT, check=True,
                   capture_output=True)
    return time.time() - started


def ask_page(browser: Browser, address: str, prompt: str) -> tuple[float, float, float]:
    """Load the page, type the prompt, press Generate -> (time.time() at the press, seconds to the
    first frame drawn, seconds to the finished video), the last two as the page measures them."""
    browser.call("POST", "/url", {"url": address})
    browser.wait(lambda: browser.run("return document.body.dataset.ready"))
    browser.type(".prompt", prompt)
    pressed = time.time()
    browser.click("#generate")
    video = browser.wait(lambda: browser.run("return document.body.dataset.video"), 600)
    return pressed, float(browser.run("return document.body.dataset.firstFrame")), float(video)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Seconds to the first video: the page beside sample.py")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", default="a dog running")
    args = p.parse_args(argv)
    rows = {}
    browser = Browser()
    try:
        with tempfile.TemporaryDirectory() as folder:
            for i in range(args.rounds):
                row = {"sample.py": sample_seconds(args.prompt, os.path.join(folder, "a.mp4"))}
                launched = time.time()
                server = subprocess.Popen([sys.executable, "serve.py", "--port", "0"], cwd=ROOT,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          text=True)
                try:
                    address = server.stdout.readline().split()[1]
                    pressed, first, video = ask_page(browser, address, args.prompt)
                    row["cold first frame"] = pressed - launched + first
                    row["cold video"] = pressed - launched + video
                    _, row["warm first frame"], row["warm video"] = ask_page(browser, address,
                                                                             args.prompt)
                finally:
                    server.terminate()
                    server.wait()
                print(f"round {i + 1}: " + " | ".join(f"{k} {v:.2f} s" for k, v in row.items()),
                      flush=True)
                for key, value in row.items():
                    rows.setdefault(key, []).append(value)
    finally:
        browser.close()
    for key, values in rows.items():
        print(f"{key}: {statistics.median(values):.2f} s (median of {len(values)})")


if __name__ == "__main__":
    main()
