"""
The Animals world's subjects, drawn as capsules: a capsule is a segment with a radius at each end,
and a body, legs, head, marks and tail are each one. A dog, cat or horse is a quadruped whose legs
swing with its gait and fold when it sits; the bird is a body and two wings that beat in flight. The
pose of every frame comes from animals.py's track (its gait phase, swing, hop, sit and altitude);
here it becomes pixels: a signed distance to the nearest capsule, anti-aliased over one pixel, under
a dark outline (a moonlit rim at night) and over the scene.

Sizes are in units of a pixel at 64 x 64 (q pixels a unit at other sizes); points are complex
numbers x + iy, y down, the origin on the ground under the body, facing right (mirrored to face
left).
"""

import numpy as np



# sprite sizes: about 31, 22, 16, 10 long
SCALE = {"horse": 1.05, "dog": 1.05, "cat": 0.85, "bird": 0.75}
# the dark outline; the moonlit rim that replaces it at night
OUTLINE, RIM = (35, 28, 22), (150, 165, 210)
# a quadruped: body half-length, body radius, leg length, leg radius at the hip and at the foot
BODY = {"horse": (7.0, 4.0, 12.0, 1.6, 1.1), "dog": (4.5, 3.0, 6.5, 1.3, 0.9),
        "cat": (3.2, 2.1, 4.4, 1.0, 0.7)}
# capsules (start, end, radius at start, at end) relative to the front of the body, facing right:
# the head; then the marks in the detail colour (eye, mane); then the tail from the rear, standing
# and sitting
HEAD = {"horse": [(0 - 1j, 3.5 - 9j, 2.8, 2.0), (3.5 - 9.5j, 8.5 - 5.5j, 2.2, 1.4),
                  (3 - 11j, 2.4 - 14j, 1.0, 0.3)],
        "dog": [(0 - 1j, 2.5 - 5j, 2.5, 2.5), (3 - 5.5j, 6.5 - 4.8j, 2.2, 1.4),
                (1.6 - 7.5j, 0.5 - 4.5j, 1.4, 1.0)],
        "cat": [(0.5 - 2j, 2 - 5j, 1.8, 2.7), (1 - 7j, 0.6 - 10j, 1.2, 0.15),
                (3.3 - 7j, 3.9 - 10j, 1.2, 0.15)]}
MARKS = {"horse": [(4.6 - 9.6j, 4.6 - 9.6j, 0.7, 0.7), (-2.2 - 2j, 1.6 - 11.5j, 1.2, 1.0)],
         "dog": [(3.4 - 6.3j, 3.4 - 6.3j, 0.6, 0.6)], "cat": [(3.3 - 5.6j, 3.3 - 5.6j, 0.55, 0.55)]}
TAIL = {"horse": ((-1 - 2j, -4 + 6j, 1.7, 1.2), (-1 + 0j, -7 + 3j)),
        "dog": ((-1.5 - 1j, -5 - 3.5j, 1.1, 0.6), (-1 + 1j, -6 + 2.5j)),
        "cat": ((-1 - 1j, -3.5 - 8j, 0.8, 0.7), (-0.5 + 1j, -6 + 1.5j))}


def _quadruped(species: str, tr: dict) -> tuple[list, list]:
    """Capsules (start, end, r0, r1) of a four-legged subject facing right, origin on
    the ground under the body, y down, with ends (T,) over frames; and its marks
    (eye, mane) in the same form."""
    (L, R, leg, r_hip, r_foot), s = BODY[species], tr["sit"]

    def mix(stand, sitting):
        # the pose between standing (s = 0) and sitting (s = 1)
        return stand + s * (sitting - stand)
    # leg phases near hind, far hind, near fore, far fore: a gallop pairs them, a walk is four-beat
    offsets = np.where(tr["run"][:, None] > 0, [0, 0.1, 0.5, 0.6], [0, 0.5, 0.25, 0.75])  # (T, 4)
    swing = tr["swing"][:, None] * np.sin(2 * np.pi * (tr["phase"][:, None] + offsets))
    # the lowest foot touches the ground
    body_y = -leg * np.cos(swing).max(axis=1)
    # a leap stretches the legs out
    swing = swing + 0.9 * tr["air"][:, None] * np.array([-1, -1, 1, 1])
    # sitting: the rump on the ground, the back raised 40 degrees
    seat = -0.3 * L - 1j * R
    rear, front = mix(-L + 1j * body_y, seat), mix(L + 1j * body_y, seat + 2 * L * np.exp(-0.7j))
    caps = [(rear, front, R, R * 0.95)]
    caps += [(front + a, front + b, r0, r1) for a, b, r0, r1 in HEAD[species]]
    for i in range(4):
        top = rear + 0.15 * L if i < 2 else front - 0.15 * L
        foot = top + leg * (np.sin(swing[:, i]) + 1j * np.cos(swing[:, i]))
        # hind legs lie flat
        folded = rear + 1.3 * L - 1j * r_foot if i < 2 else front.real + 0.6 + 0.3 * (i % 2)
        caps.append((top, mix(foot, folded), r_hip, r_foot))
    (a0, b0, r0, r1), (a1, b1) = TAIL[species]
    # a sitting subject wags harder
    wag = np.exp(1j * 0.25 * np.sin(2 * np.pi * tr["wag"]) * (1 + s))
    caps.append((rear + mix(a0, a1), rear + mix(a0, a1) + mix(b0 - a0, b1 - a1) * wag, r0, r1))
    return caps, [(front + a, front + b, r0, r1) for a, b, r0, r1 in MARKS[species]]


def _bird(tr: dict) -> tuple[list, list]:
    """The bird's capsules and eye, as _quadruped: the wing flaps in the air,
    the legs show when perched."""
    # 1 once off the ground
    fly = np.clip(tr["alt"] / 10, 0, 1)
    flap = np.cos(2 * np.pi * tr["phase"]) * fly
    caps = [(-2.5 - 4.5j, 2 - 5j, 2.2, 2.0), (3 - 7j, 3.2 - 7j, 1.9, 1.9), (4.5 - 7j, 6.4 - 6.5j, 0.7, 0.15),
            # the tail droops when perched
            (-3 - 4.3j, -6 - 4.3j + 2.5j * (1 - fly), 1.2, 0.6),
            # the wing, folded when perched
            (0 - 5.5j, -3 - 4.5j + fly * (0.5 - 7.5j * flap), 1.8, 0.6),
            # the legs, tucked in flight
            (0.5 - 3j, 0.7 - 3j + 3j * (1 - fly), 0.45, 0.4)]
    return caps, [(3.6 - 7.3j, 3.6 - 7.3j, 0.55, 0.55)]


def capsule_distance(p: np.ndarray, caps: list) -> np.ndarray:
    """Signed distance from points p (complex) to a union of tapered capsules: a
    pixel's coverage is 0.5 - it."""
    out = np.full(p.shape, np.inf, dtype=np.float32)
    for a, b, r0, r1 in caps:
        d, e = p - a, b - a
        t = np.clip((d.real * e.real + d.imag * e.imag) / np.maximum(np.abs(e) ** 2, 1e-6), 0, 1)
        np.minimum(out, np.abs(d - t * e) - (r0 + (r1 - r0) * t), out=out)
    return out


def draw_subject(video: np.ndarray, spec, tr: dict, color: tuple, ground: float) -> None:
    """Draw the subject into video (T, H, W, 3) float, in place, centred; only a
    box around it is computed."""
    (T, H, W, _), flip = video.shape, -1 if spec.direction == "left" else 1
    q = W / 64 * SCALE[spec.species]

    def place(parts):
        # mirrored (x -> -x) to face left, in pixels, ends (T or 1, 1, 1) against pixels (T, h, w)
        return [(*(np.reshape((z.real * flip + 1j * z.imag) * q, (-1, 1, 1)) for z in (a, b)),
                 r0 * q, r1 * q) for a, b, r0, r1 in parts]
    caps, marks = map(place, _bird(tr) if spec.species == "bird" else _quadruped(spec.species, tr))
    # both ends of every capsule
    ends = []
    for a, b, _, _ in caps:
        ends += [a.ravel(), b.ravel()]
    ends = np.concatenate(ends)
    pad = 3 + max(max(r0, r1) for _, _, r0, r1 in caps)
    x0, x1 = int(np.floor(W / 2 + ends.real.min() - pad)), int(np.ceil(W / 2 + ends.real.max() + pad))
    y0, y1 = int(np.floor(ends.imag.min() - pad)), int(np.ceil(ends.imag.max() + pad))
    origin = (ground - tr["hop"] - tr["alt"]) * W / 64  # (T,) the row of the local origin
    row, frac = np.floor(origin).astype(int), origin - np.floor(origin)
    xs, ys = np.arange(x0, x1) + 0.5 - W / 2, np.arange(y0, y1)[None, :, None] + 0.5 - frac[:, None, None]
    p = (xs + 1j * ys).astype(np.complex64)  # (T, h, w) pixel centres in the subject's frame
    sdf = capsule_distance(p, caps)
    # coverage (T, h, w, 1)
    body = np.clip(0.5 - sdf, 0, 1)[..., None]
    # the body and its outline
    outer = np.clip(0.5 + max(1, W / 64) - sdf, 0, 1)[..., None]
    detail = np.clip(0.5 - capsule_distance(p, marks), 0, 1)[..., None] * outer
    color = np.array(color, np.float32)
    dark = np.array(RIM if spec.scene == "at night" else OUTLINE)
    # eyes and mane
    ink = np.array((200, 200, 170) if spec.color == "black" else OUTLINE, np.float32)
    c0, c1 = max(x0, 0), min(x1, W)
    for t in range(T):
        # paste each frame's box where the subject stands in it, clipped to the frame
        top, bottom = max(row[t] + y0, 0), min(row[t] + y1, H)
        if top < bottom:
            box = (t, slice(top - row[t] - y0, bottom - row[t] - y0), slice(c0 - x0, c1 - x0))
            b = body[box]
            o = outer[box]
            e = detail[box]
            region = video[t, top:bottom, c0:c1]
            drawn = (region * (1 - o) + dark * (o - b) + color * b) * (1 - e) + ink * e
            video[t, top:bottom, c0:c1] = drawn


