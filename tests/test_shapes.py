import numpy as np
import pytest

from worlds.shapes import (EDGES, ShapeSpec, ShapesSource, agreement, oracle, random_spec,
                           render_shapes)


def test_the_oracle_reads_back_what_was_rendered():
    rng = np.random.default_rng(7)
    specs = [random_spec(rng) for _ in range(60)]
    verdicts = [agreement(render_shapes(s, 11, 64, rng), s) for s in specs]
    for attribute in ("color", "shape", "size", "direction", "one_object"):
        assert np.mean([v[attribute] for v in verdicts]) >= 0.98, attribute


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_a_leaving_object_is_cut_by_the_edge_ahead_then_gone(direction):
    spec = ShapeSpec("red", "square", "large", direction)
    seen = oracle(render_shapes(spec, 21, 64, np.random.default_rng(1), edge="leave"))
    objects, partial = np.array(seen["objects"]), np.array(seen["partial"])
    assert objects.max() == 1 and partial.any() and objects[-1] in (0, 1)
    first_cut = partial.argmax()
    assert not partial[:first_cut].any() and (objects[first_cut:][~partial[first_cut:]] == 0).all()  # out, not back
    assert seen["direction"] == direction and seen["shape"] == "square" and seen["size"] == "large"


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_an_entering_object_is_partly_in_at_the_first_frame_then_whole(direction):
    spec = ShapeSpec("blue", "circle", "large", direction)
    seen = oracle(render_shapes(spec, 11, 64, np.random.default_rng(2), edge="enter"))
    objects, partial = np.array(seen["objects"]), np.array(seen["partial"])
    assert objects[0] == 1 and (objects == 1).all()  # never an empty canvas before it comes in
    assert not partial[-1] and seen["direction"] == direction and seen["shape"] == "circle"


def test_the_source_makes_a_share_of_moving_objects_cross_the_edge():
    source = ShapesSource(frames=11, size=64)
    crossed = moving = 0
    for k in range(400):
        video, text = source.load(k)
        if "still" in text or "not move" in text or "in place" in text or "not moving" in text:
            continue
        moving += 1
        crossed += any(oracle(video)["partial"])
    assert abs(crossed / moving - EDGES) < 0.05
    assert not any(any(oracle(ShapesSource(edges=0.0).load(k)[0])["partial"]) for k in range(100))


def test_fragments_too_small_to_be_an_object_still_show_in_the_lit_area():
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    frames[0, 30:32, 58:61] = (255, 0, 0)  # 6 red pixels left at the edge: no object, but not empty either
    seen = oracle(frames)
    assert seen["objects"] == [0, 0] and seen["areas"] == [6, 0]
