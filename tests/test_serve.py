"""serve.py, the page that makes videos in a browser, on the shipped Shapes pair: a request comes
back as a playable .mp4 of the asked length, the frames sample.py makes; every bad request gets a
4xx and one line, and the server goes on; jobs wait their turn, and a page that goes away frees the
model; a bad command line is one line; the command prints its address and removes its folder when
stopped; and a real browser (headless Chromium, driven through chromedriver's W3C WebDriver HTTP
API with urllib) shows a refusal, edits its prompt boxes, presses Generate and watches the video
play."""

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import av
import numpy as np
import pytest
import torch

import sample
import serve
from kit.checkpoint import shipped
from media.video import read_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RED = {"prompts": ["a red circle moving right"], "frames": 5, "steps": 4}
# the smallest good request, sent after each bad one
TINY = {"prompts": ["a red circle moving right"], "frames": 1, "steps": 1}


@pytest.fixture(scope="module")
def server():
    pairs = {"shapes": (shipped("shapes", "generator"), shipped("shapes", "tokenizer"))}
    running = serve.Server(("127.0.0.1", 0), pairs, torch.device("cpu"))
    threading.Thread(target=running.serve_forever, daemon=True).start()
    yield running
    running.shutdown()
    running.server_close()


def ask(server, method: str, path: str, body: bytes | None = None) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    connection.request(method, path, body)
    return connection.getresponse()


def post(server, request: dict) -> http.client.HTTPResponse:
    return ask(server, "POST", "/generate", json.dumps(request).encode())


def events(response: http.client.HTTPResponse) -> list[dict]:
    assert response.status == 200, response.read()
    return [json.loads(line) for line in response]


def frames_of(stream: list[dict]) -> np.ndarray:
    """The frames a stream sent, (T, H, W, 3) uint8."""
    frames = []
    for event in stream:
        for frame in event.get("frames", []):
            pixels = np.frombuffer(base64.b64decode(frame), np.uint8)
            frames.append(pixels.reshape(*event["size"], 3))
    return np.stack(frames)


def decoded(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_a_prompt_comes_back_as_an_mp4_of_the_asked_length(server, tmp_path):
    stream = events(post(server, RED))
    done = stream[-1]["done"]
    assert done["frames"] == 5
    assert frames_of(stream).shape == (5, 64, 64, 3)
    for ext in ("mp4", "gif"):
        response = ask(server, "GET", f"/video/{done['video']}.{ext}")
        assert response.status == 200
        path = tmp_path / f"red.{ext}"
        path.write_bytes(response.read())
        # written at the request's zoom, 4 by default
        assert decoded(path).shape == (5, 256, 256, 3)


def test_a_story_on_the_page_is_the_one_sample_py_makes(server, tmp_path):
    """Two prompts, a seed, few steps: the page's .mp4 holds the frames of `python sample.py` asked
    the same, and the frames streamed to the page are those (before H.264's small losses)."""
    prompts = ["a red circle moving right", "a red circle moving down"]
    sample.main([*prompts, "--world", "shapes", "--frames", "5", "--steps", "2", "--seed", "7",
                 "--out", str(tmp_path / "sample.mp4")])
    request = {"prompts": prompts, "frames": 5, "steps": 2, "seed": 7, "scale": 1}
    stream = events(post(server, request))
    assert stream[0]["plan"]["segments"] == [3, 2]
    page = ask(server, "GET", f"/video/{stream[-1]['done']['video']}.mp4")
    (tmp_path / "page.mp4").write_bytes(page.read())
    made = decoded(tmp_path / "sample.mp4")
    np.testing.assert_array_equal(decoded(tmp_path / "page.mp4"), made)
    assert np.abs(frames_of(stream).astype(int) - made).mean() < 3


BAD = [
    ("not JSON", b'{"prompts": ["a red', 400, "not JSON"),
    ("a list", b'["a red circle"]', 400, "JSON object"),
    ("empty prompt", {"prompts": ["a red circle", "  "]}, 400, "prompt 2 is empty"),
    ("long prompt", {"prompts": ["a" * 10_000]}, 400, "10000 characters"),
    ("no prompt", {"prompts": []}, 400, "give 1 to 10 prompts"),
    ("11 segments", {"prompts": ["a red circle"] * 11}, 400, "give 1 to 10 prompts"),
    ("frames even", {"prompts": ["a red circle"], "frames": 12}, 400, "1 + 2n"),
    ("frames 0", {"prompts": ["a red circle"], "frames": 0}, 400, "in 1 to 241, got"),
    ("frames 243", {"prompts": ["a red circle"], "frames": 243}, 400, "in 1 to 241, got"),
    ("frames a text", {"prompts": ["a red circle"], "frames": "11"}, 400, "whole number"),
    ("fewer frames than prompts", {"prompts": ["a", "b", "c"], "frames": 1}, 400,
     "ask for at least --frames 3"),
    ("seed a text", {"prompts": ["a red circle"], "seed": "abc"}, 400, "seed must be a whole"),
    ("seed a fraction", {"prompts": ["a red circle"], "seed": 1.5}, 400, "seed must be a whole"),
    ("seed negative", {"prompts": ["a red circle"], "seed": -1}, 400, "--seed must lie in 0"),
    ("guidance NaN", b'{"prompts": ["a red circle"], "cfg": NaN}', 400, "--cfg must lie in 0"),
    ("guidance a text", {"prompts": ["a red circle"], "cfg": "1.5"}, 400, "must be a number"),
    ("steps 0", {"prompts": ["a red circle"], "steps": 0}, 400, "--steps must lie in 1 to 1000"),
    ("zoom 17", {"prompts": ["a red circle"], "scale": 17}, 400, "scale must lie in 1 to 16"),
    ("unknown world", {"prompts": ["a red circle"], "world": "mars"}, 400, "world must be one of"),
    ("unknown field", {"prompts": ["a red circle"], "out": "/etc/passwd"}, 400, "unknown field"),
    ("too large", {"prompts": ["a red circle"], "padding": "x" * 70_000}, 413, "at most 65536"),
    ("a path", ("GET", "/etc/passwd"), 404, "nothing at /etc/passwd"),
    ("a path up", ("GET", "/video/../serve.py"), 404, "nothing at"),
    ("an unknown video", ("GET", "/video/0123456789abcdef.mp4"), 404, "no video"),
    ("a post elsewhere", ("POST", "/video"), 404, "POST /generate"),
]


@pytest.mark.parametrize("body, status, words", [case[1:] for case in BAD],
                         ids=[case[0].replace(" ", "_") for case in BAD])
def test_a_bad_request_gets_its_4xx_and_one_line_and_the_next_one_works(server, body, status,
                                                                        words):
    if isinstance(body, tuple):
        response = ask(server, *body)
    elif isinstance(body, dict):
        response = post(server, body)
    else:
        response = ask(server, "POST", "/generate", body)
    assert response.status == status
    error = json.loads(response.read())["error"]
    assert words in error and "\n" not in error and "Traceback" not in error
    assert events(post(server, TINY))[-1]["done"]["frames"] == 1


def test_jobs_wait_their_turn_and_a_page_that_leaves_frees_the_model(server, monkeypatch):
    monkeypatch.setattr(serve, "MAX_WAITING", 2)
    # a job of minutes: 241 frames at 100 steps a window
    first = post(server, {"prompts": ["a red circle moving right"], "frames": 241, "steps": 100})
    assert json.loads(first.readline())["plan"]["frames"] == 241
    assert "step" in json.loads(first.readline())
    second = post(server, RED)
    assert json.loads(second.readline()) == {"queued": 1}
    third = post(server, RED)
    assert json.loads(third.readline()) == {"queued": 2}
    refused = post(server, RED)
    assert refused.status == 503 and "busy" in json.loads(refused.read())["error"]
    # a waiting page that leaves gives up its place within a second
    third.close()
    given_up = time.time() + 5
    while len(server.line.jobs) > 2 and time.time() < given_up:
        time.sleep(0.1)
    assert len(server.line.jobs) == 2
    before = len(server.videos)
    # the tab is closed: the first job ends at its next decoding step
    first.close()
    deadline = time.time() + 20
    for line in second:
        assert time.time() < deadline, "the first job still holds the model"
    assert json.loads(line)["done"]["frames"] == 5
    assert len(server.videos) == before + 1
    assert server.line.jobs == []


@pytest.mark.parametrize("argv", [["--checkpoint", "missing.safetensors"], ["--port", "70000"],
                                  ["--port", "BUSY"], ["--device", "tpu"]],
                         ids=["missing_checkpoint", "port_70000", "port_taken", "device_tpu"])
def test_a_bad_command_line_is_one_line_and_exit_code_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(serve.tempfile, "tempdir", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        argv = [port if word == "BUSY" else word for word in argv]
        if "--port" not in argv:
            # a free port: only the flag under test is wrong
            argv += ["--port", "0"]
        with pytest.raises(SystemExit) as leaving:
            serve.main(argv)
    assert leaving.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # no folder of videos left behind
    assert os.listdir(tmp_path) == []


def test_the_command_prints_its_address_and_removes_its_folder_when_stopped():
    command = [sys.executable, "serve.py", "--world", "shapes", "--port", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        address = process.stdout.readline().split()[1]
        folder = process.stdout.readline().split()[1]
        assert os.path.isdir(folder)
        with urllib.request.urlopen(address, timeout=30) as page:
            assert b"Generate" in page.read()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    assert not os.path.exists(folder)


class Browser:
    """Headless Chromium through chromedriver's W3C WebDriver HTTP API: a session, calls on it."""

    def __init__(self, width: int = 1300, height: int = 800):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.driver = subprocess.Popen(["chromedriver", f"--port={port}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        self.wait(lambda: self.call("GET", "/status")["ready"], errors=(OSError,))
        args = ["--headless=new", "--no-sandbox", f"--window-size={width},{height}",
                "--autoplay-policy=no-user-gesture-required"]
        options = {"binary": shutil.which("chromium"), "args": args}
        session = self.call("POST", "/session",
                            {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}})
        self.base += f"/session/{session['sessionId']}"

    def call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data, method=method)
        with urllib.request.urlopen(request, timeout=60) as reply:
            return json.loads(reply.read())["value"]

    def wait(self, ready, seconds: float = 60, errors: tuple = ()):
        """Poll `ready` until it returns something true; that."""
        end = time.time() + seconds
        while time.time() < end:
            try:
                found = ready()
                if found:
                    return found
            except errors:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"not ready in {seconds} s")

    def run(self, script: str):
        return self.call("POST", "/execute/sync", {"script": script, "args": []})

    def element(self, css: str) -> str:
        found = self.call("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(found.values()))

    def type(self, css: str, text: str) -> None:
        self.call("POST", f"/element/{self.element(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        self.call("POST", f"/element/{self.element(css)}/click", {})

    def screenshot(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("GET", "/screenshot")))

    def close(self) -> None:
        self.call("DELETE", "")
        self.driver.terminate()
        self.driver.wait()


PLAYING = "const v = document.querySelector('video'); return !v.paused && v.currentTime > 0.2"


@pytest.mark.skipif(shutil.which("chromedriver") is None,
                    reason="no chromedriver: apt-get install chromium chromium-driver, as .ci/run")
def test_a_browser_types_a_prompt_and_the_video_plays(server, tmp_path):
    browser = Browser()
    try:
        browser.call("POST", "/url", {"url": "http://%s:%d/" % server.server_address[:2]})
        browser.wait(lambda: browser.run("return document.body.dataset.ready"))
        # an empty prompt: the server's one line shows on the page
        browser.click("#generate")
        browser.wait(lambda: "empty" in browser.run("return $('error').textContent"))
        # a second box, typed in, moved up, and the empty one removed
        browser.click("#add")
        browser.type("#prompts li:nth-child(2) .prompt", "a red circle moving right")
        browser.click("#prompts li:nth-child(2) [title='move up']")
        browser.click("#prompts li:nth-child(2) [title='remove']")
        typed = browser.run("return [...document.querySelectorAll('.prompt')].map(p => p.value)")
        assert typed == ["a red circle moving right"]
        browser.click("#generate")
        browser.wait(lambda: browser.run(PLAYING))
        box = browser.run("const r = document.querySelector('video').getBoundingClientRect();"
                          "return [r.top, r.left, r.bottom, r.right, devicePixelRatio]")
        browser.screenshot(str(tmp_path / "page.png"))
        grid = browser.run("return document.querySelectorAll('#grid canvas').length")
    finally:
        browser.close()
    assert grid == 11
    page = read_video(str(tmp_path / "page.png"))[0]  # (H, W, 3)
    top, left, bottom, right = (round(x * box[4]) for x in box[:4])
    video = page[top:bottom, left:right].astype(int)
    assert page.std() > 10, "the page is blank"
    # the video shows the red circle: pixels far more red than green or blue
    red = (video[..., 0] > 150) & (video[..., 1] < 90) & (video[..., 2] < 90)
    assert 100 < red.sum() < 0.5 * red.size, red.sum()
