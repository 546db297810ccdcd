"""Tests for video.py: PyAV decoding (resized, cropped, resampled by timestamp, rotation undone, odd
pixel formats, resolutions and frame rates), writing .mp4 and .gif, and the limits on what one file may
ask (MAX_PIXELS, MAX_LEAD, MAX_FRAMES). Every file is made here with PyAV and numpy. Encoders used:
libx264 (yuv420p, yuv444p for odd sides, gray, gray10le, yuv420p10le), ffv1, qtrle, png, libvpx-vp9
(yuva420p). CPU only."""

import io
import os
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from data import VideoFolderSource
from media.video import VideoWriter, read_video, write_video

RED = (200, 50, 100)  # a colour that survives 4:2:0 chroma and 10 bits within a few levels


def encode(path, video: np.ndarray, codec: str = "libx264", pix_fmt: str = "yuv420p", fps: int = 16,
           pts_ms: list[int] | None = None, options: dict | None = None, fmt: str | None = None) -> None:
    """Write (T, H, W, 3 or 4) uint8 frames with PyAV; `pts_ms` gives each frame its own time (VFR)."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.height, stream.width, stream.pix_fmt = video.shape[1], video.shape[2], pix_fmt
        if pts_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        container.start_encoding()  # writes the header even when there is no frame
        for t, img in enumerate(video):
            frame = av.VideoFrame.from_ndarray(img, format="rgba" if img.shape[-1] == 4 else "rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[t], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def solid(frames: int, height: int, width: int, rgb=RED) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (frames, height, width, len(rgb))).copy()


def moving_square(frames: int = 24, height: int = 48, width: int = 80) -> np.ndarray:
    """(T, H, W, 3) uint8: a white 8 x 8 square whose left edge is at x = 3 t in frame t."""
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        video[t, 16:24, 3 * t:3 * t + 8] = 255
    return video


def encode_mp4(path, video: np.ndarray, fps: int = 16, rotation: int = 0) -> None:
    """Write an H.264 .mp4 with PyAV directly, so that reading is not tested against our own writer."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = video.shape[1], video.shape[2], "yuv420p"
        if rotation:
            stream.set_display_rotation(rotation)
        for img in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())


def square_x(img: np.ndarray) -> float:
    """Left edge of the bright square, in pixels."""
    return float(np.flatnonzero(img.max(axis=(0, 2)) > 128).min())


def test_read_video_resizes_crops_and_resamples_by_timestamp(tmp_path):
    encode_mp4(tmp_path / "a.mp4", moving_square())  # 24 frames at 16 fps: 1.5 s
    full = read_video(str(tmp_path / "a.mp4"))
    assert full.shape == (24, 48, 80, 3) and full.dtype == np.uint8
    half = read_video(tmp_path / "a.mp4", fps=8)
    assert half.shape[0] == 12  # 1.5 s at 8 fps
    # every second frame: the square's edge moves 6 pixels per output frame, starting at 0
    assert [square_x(f) for f in half] == pytest.approx([6 * j for j in range(12)], abs=1)
    clip = read_video(tmp_path / "a.mp4", frames=5, size=32, fps=8, start=0.5)
    assert clip.shape == (5, 32, 32, 3)
    # 48 x 80 -> 32 x 53, cropped to columns 10..42; at 0.5 s (frame 8) the edge is at 24 * 32 / 48 - 10
    assert square_x(clip[0]) == pytest.approx(24 * 32 / 48 - 10, abs=1)


def test_read_video_undoes_display_rotation(tmp_path):
    video = np.zeros((2, 16, 32, 3), dtype=np.uint8)
    video[:, :8, :8] = 255  # a bright top-left corner
    encode_mp4(tmp_path / "r.mp4", video, rotation=90)
    upright = read_video(tmp_path / "r.mp4")
    assert upright.shape == (2, 32, 16, 3)  # a quarter turn swaps height and width
    assert upright[0, -4:, :4].min() > 200  # 90 degrees counter-clockwise: top-left goes bottom-left


def test_read_video_rejects_bad_files(tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "empty.mp4").write_bytes(b"")
    encode_mp4(tmp_path / "short.mp4", moving_square(8))
    for bad in ("corrupt.mp4", "empty.mp4", "missing.mp4"):
        with pytest.raises((ValueError, OSError)):
            read_video(str(tmp_path / bad))
    with pytest.raises((ValueError, OSError)):
        read_video(io.BytesIO(b"not a video at all"))
    with pytest.raises(ValueError, match="too short"):
        read_video(tmp_path / "short.mp4", frames=11, fps=8)  # 0.5 s holds 4 frames at 8 fps


def test_write_video_mp4_and_gif_round_trip(tmp_path):
    video = moving_square(6, 25, 33)  # odd sides: H.264 4:2:0 needs them padded
    write_video(str(tmp_path / "v.mp4"), video, fps=8)
    with av.open(str(tmp_path / "v.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and (stream.height, stream.width) == (26, 34)
        assert len(list(container.decode(stream))) == 6
    write_video(str(tmp_path / "v.gif"), video, fps=8)
    gif = read_video(str(tmp_path / "v.gif"))
    assert gif.shape == (6, 25, 33, 3)
    assert square_x(gif[5]) == 15  # the white square survives the 8-bit palette where it was
    # GIF stores times in 1/100 s (0.125 s becomes 0.13 s), yet resampling still picks each frame once
    assert [square_x(f) for f in read_video(str(tmp_path / "v.gif"), fps=8)] == [3 * t for t in range(6)]
    for bad in ("v.png", "v.avi2", "v"):
        with pytest.raises(ValueError):
            write_video(str(tmp_path / bad), video)


def test_odd_pixel_formats_decode_to_rgb_and_drop_alpha(tmp_path):
    grey = solid(8, 16, 16, (128, 128, 128))
    alpha = solid(8, 16, 16, RED + (255,))
    alpha[:, :, :8, 3] = 0  # the left half is fully transparent: its colour must come back all the same
    cases = [("gray.mp4", grey, "libx264", "gray", (128,) * 3),
             ("gray10.mp4", grey, "libx264", "gray10le", (128,) * 3),
             ("ten.mp4", solid(8, 16, 16), "libx264", "yuv420p10le", RED),
             ("qtrle.mov", alpha, "qtrle", "argb", RED), ("png.mov", alpha, "png", "rgba", RED),
             ("vp9.webm", alpha, "libvpx-vp9", "yuva420p", RED), ("ffv1.mkv", alpha, "ffv1", "yuva420p", RED)]
    for name, video, codec, pix_fmt, rgb in cases:
        encode(tmp_path / name, video, codec, pix_fmt)
        clip = read_video(tmp_path / name, frames=3, size=8, fps=8)
        assert clip.shape == (3, 8, 8, 3) and clip.dtype == np.uint8, name
        assert np.abs(clip.astype(int) - rgb).max() <= 6, (name, clip.reshape(-1, 3).mean(0))


def test_odd_and_huge_resolutions_come_out_size_by_size(tmp_path):
    for h, w in ((1, 1), (7, 13), (33, 17)):  # odd sides: H.264 needs 4:4:4, ffv1 takes 4:2:0
        encode(tmp_path / f"{h}x{w}.mp4", solid(8, h, w), pix_fmt="yuv444p")
        encode(tmp_path / f"{h}x{w}.mkv", solid(8, h, w), codec="ffv1")
    huge = np.zeros((3, 2160, 4096, 3), np.uint8)
    huge[:, :, :2048] = 255  # left half white: the centre crop shows white, then black
    encode(tmp_path / "4k.mp4", huge, fps=8, options={"preset": "ultrafast"})
    source = VideoFolderSource(str(tmp_path), frames=3, size=16)
    for k in range(len(source)):
        path = source.item(k)[0]
        clip = source.load(k)[0]
        assert clip.shape == (3, 16, 16, 3), path.name
        if path.name == "4k.mp4":
            assert clip[:, :, :7].min() > 240 and clip[:, :, 9:].max() < 15
        else:
            assert np.abs(clip.astype(int) - RED).max() <= 6, path.name


def test_a_strip_too_large_once_resized_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("media.video.MAX_PIXELS", 64 * 64)
    encode(tmp_path / "strip.mkv", solid(2, 4, 400), codec="ffv1")  # 1600 pixels, but 16 x 1600 resized
    assert read_video(tmp_path / "strip.mkv", size=2).shape == (2, 2, 2, 3)  # 2 x 200 fits
    with pytest.raises(ValueError, match=r"400 x 4 frames \(resized 1600 x 16\) are above MAX_PIXELS"):
        read_video(tmp_path / "strip.mkv", size=16)


def test_variable_frame_rate_is_resampled_by_timestamp(tmp_path):
    pts_ms = [0, 40, 300, 330, 700, 760, 1200, 1500, 1990]  # irregular gaps, 9 frames in 2 s
    video = np.stack([np.full((16, 16, 3), 25 * i, np.uint8) for i in range(len(pts_ms))])
    for name in ("vfr.mp4", "vfr.mkv"):
        encode(tmp_path / name, video, pts_ms=pts_ms)
        clip = read_video(tmp_path / name, frames=15, fps=10)
        assert clip.shape == (15, 16, 16, 3)
        # the frame on screen at i / 10 s is the last one whose time is at or before it
        on_screen = np.searchsorted(np.array(pts_ms) / 1000, np.arange(15) / 10 + 1e-9, side="right") - 1
        assert (np.round(clip[:, 8, 8, 0] / 25) == on_screen).all(), name


def test_timestamp_jump_and_sparse_key_frames_are_bounded(tmp_path, monkeypatch):
    # one frame shown for 11 days: a whole-video read at 8 fps would repeat it without end
    encode(tmp_path / "jump.mkv", solid(3, 16, 16), pts_ms=[0, 100, 10 ** 9])
    start = time.perf_counter()
    with pytest.raises(ValueError, match="MAX_FRAMES"):
        read_video(tmp_path / "jump.mkv", fps=8)
    assert time.perf_counter() - start < 5
    assert read_video(tmp_path / "jump.mkv", frames=11, fps=8).shape == (11, 16, 16, 3)
    # one key frame in 64: seeking to 3 s decodes 48 frames before the clip's first
    monkeypatch.setattr("media.video.MAX_LEAD", 20)
    encode(tmp_path / "gop.mp4", solid(64, 16, 16), options={"g": "1000", "sc_threshold": "0"})
    assert read_video(tmp_path / "gop.mp4", frames=3, fps=8, start=0.5).shape == (3, 16, 16, 3)
    with pytest.raises(ValueError, match="no frame at 3.00 s within 20 decoded frames"):
        read_video(tmp_path / "gop.mp4", frames=3, fps=8, start=3.0)


def test_an_interrupted_writer_leaves_the_earlier_file_and_no_part(tmp_path):
    path = str(tmp_path / "v.mp4")
    video = np.full((3, 16, 16, 3), 200, np.uint8)
    write_video(path, video)
    before = open(path, "rb").read()
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path) as writer:
            writer.write(np.zeros((5, 16, 16, 3), np.uint8))
            raise KeyboardInterrupt
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["v.mp4"]


def test_a_video_written_in_pieces_equals_one_written_whole(tmp_path):
    video = np.random.default_rng(0).integers(0, 255, (9, 16, 16, 3), dtype=np.uint8)
    write_video(str(tmp_path / "whole.mp4"), video)
    with VideoWriter(str(tmp_path / "pieces.mp4")) as writer:
        for start in range(0, 9, 4):
            writer.write(video[start:start + 4])
    assert np.array_equal(read_video(str(tmp_path / "whole.mp4")), read_video(str(tmp_path / "pieces.mp4")))


def _read_both_ways(path: str) -> None:
    read_video(path, size=32)
    read_video(path)


def test_a_process_forked_after_a_read_reads_too(tmp_path):
    """DataLoader workers are forked after the main process decoded its held-out clips; a scaler
    they inherit with its threads missing hung them for good (PyAV 18's per-thread scaler)."""
    import multiprocessing
    path = str(tmp_path / "a.mp4")
    encode(path, np.random.default_rng(0).integers(0, 255, (3, 48, 64, 3), dtype=np.uint8))
    # resized, and converted to RGB as it is: both go through swscale
    _read_both_ways(path)
    child = multiprocessing.get_context("fork").Process(target=_read_both_ways, args=(path,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0, "the forked reader hung or failed"
