"""Tests for the motion probe and the continuation test (motion.py): which codes count as moved, what
each mask scores, and that the continuation judges the frames after the context. Tiny stand-ins; CPU only."""

import numpy as np
import torch
import torch.nn.functional as F

from evals import motion
from evals.motion import continuation, motion_probe
from maskgit import MaskGIT, MaskGITConfig
from text_encoder import CaptionTokenizer, TextEncoderConfig


class Predictor:
    """A stand-in generator for the probe: `rule` turns the true codes (B, t, h, w) into its predictions."""

    def __init__(self, rule, K: int = 16):
        text = TextEncoderConfig(vocab_size=300, dim=8, depth=1, heads=1, mlp=8, max_len=8)
        self.config = MaskGITConfig(codebook_size=K, latent_frames=4, grid=2, dim=8, depth=1, heads=1, mlp=8, text=text)
        self.model, self.rule, self.K, self.truth = MaskGIT(self.config), rule, K, None

    def mask_positions(self, codes, *args):
        return self.model.mask_positions(codes, *args)

    def predict(self, tokens, ids, mask):  # a confident one-hot on the rule's code
        return F.one_hot(self.rule(self.truth[:len(tokens)]), self.K).float() * 20


def clips(n: int = 64) -> torch.Tensor:
    """Codes (n, 4, 2, 2) where about half the codes of frames 1.. repeat the frame before."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(16, (n, 4, 2, 2), generator=g)
    for f in range(1, 4):
        same = torch.rand(n, 2, 2, generator=g) < 0.5
        codes[:, f] = torch.where(same, codes[:, f - 1], codes[:, f])
    return codes


def probe(rule) -> dict:
    model, codes = Predictor(rule), clips()
    model.truth = codes
    ids, mask = torch.zeros(64, 3, dtype=torch.long), torch.ones(64, 3, dtype=torch.bool)
    return motion_probe(model, codes, ids, mask, batch_size=64)


def test_a_model_that_copies_the_frame_before_is_right_on_still_codes_and_wrong_on_moved_ones():
    copy = probe(lambda c: torch.cat([c[:, :1], c[:, :-1]], dim=1))  # each code as one latent frame before
    for kind in ("random", "next"):
        assert copy[f"probe_{kind}_still_acc"] == 1.0 and copy[f"probe_{kind}_moved_acc"] == 0.0
        assert copy[f"probe_{kind}_still_loss"] < 1e-3 < 10 < copy[f"probe_{kind}_moved_loss"]
    oracle = probe(lambda c: c)
    assert all(oracle[f"probe_{k}_{g}_acc"] == 1.0 for k in ("random", "next") for g in ("moved", "still"))


def test_the_probe_scores_frames_after_the_context_under_next_masks():
    """Right on the last latent frames only: the 'next' mask (frames 2, 3 masked) sees all of it, random
    masks only the part that falls there."""
    def late_only(c):  # the truth in latent frames 2 and 3, a wrong code in 0 and 1
        wrong = (c + 1) % 16
        return torch.cat([wrong[:, :2], c[:, 2:]], dim=1)
    seen = probe(late_only)
    assert seen["probe_next_moved_acc"] == 1.0 and seen["probe_next_still_acc"] == 1.0
    assert 0.2 < seen["probe_random_moved_acc"] < 0.9


def test_continuation_judges_the_frames_after_the_real_context(monkeypatch):
    """A generator that freezes the last real frame: every action reads as sitting after the context, so
    only sitting is held; were the context judged, running would be."""
    def frozen(model, tokenizer, prompts, frames, init=None, **sampling):
        return torch.cat([init, init[:, :, -1:].expand(-1, -1, sum(frames), -1, -1)], dim=2)
    monkeypatch.setattr(motion, "make_video", frozen)
    text = CaptionTokenizer.train(["a brown dog running to the right on the grass"] * 3, vocab_size=300)
    model = Predictor(lambda c: c)
    seen = continuation(model, text, None, clips_per_action=2, windows=2)
    assert seen["continue_sitting"] == 1.0
    assert seen["continue_running"] == seen["continue_walking"] == seen["continue_jumping"] == 0.0
    assert np.isclose(seen["continue_action"], np.mean([seen[f"continue_{a}"] for a in
                                                        ("running", "walking", "jumping", "sitting", "flying")]))


class CellCoder:
    """A stand-in tokenizer: latent frame k is frame 2k (frame 0 alone), each 8 x 8 cell coded by `rule`
    of its pixels (N, t, h, w, 192) and its column index."""

    def __init__(self, rule):
        self.rule = rule

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        x = video[:, :, ::2]  # (N, 3, t, H, W)
        N, C, t, H, W = x.shape
        cells = x.view(N, C, t, H // 8, 8, W // 8, 8).permute(0, 2, 3, 5, 1, 4, 6).reshape(N, t, H // 8, W // 8, -1)
        return self.rule(cells, torch.arange(W // 8))  # (N, t, h, w)


WEIGHTS = torch.randn(192, generator=torch.Generator().manual_seed(0))


def test_codes_of_their_own_cell_follow_a_slide_by_one_code_and_are_local():
    follows = motion.code_following(CellCoder(lambda cells, col: torch.round(cells @ WEIGHTS * 100).long()), clips=2)
    assert follows["follow_grid"] == 1.0 and follows["nonlocal"] == 0.0


def test_codes_that_name_their_place_do_not_follow_and_a_frame_statistic_makes_them_nonlocal():
    still = motion.code_following(CellCoder(lambda cells, col: col.expand(*cells.shape[:3], -1)), clips=2)
    assert still["follow_grid"] == 0.0 and still["follow_real"] == 0.0
    by_mean = CellCoder(lambda cells, col: torch.round((cells @ WEIGHTS + cells.mean(dim=(2, 3, 4))[..., None, None])
                                                        * 100).long())
    assert motion.code_following(by_mean, clips=2)["nonlocal"] > 0.5
