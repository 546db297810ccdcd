import gc

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kit.checkpoint import load_tokenizer, shipped
from maskgit import (CFG, CONTEXT_TEMPERATURE, TEMPERATURE, MaskGIT, MaskGITConfig, draw,
                     make_video, mask_ratio, plan_windows, stream_video)
from text_encoder import BOS, PAD, CaptionTokenizer, TextEncoderConfig
from vqgan import VQGAN, VQGANConfig
from worlds import animals, shapes
from worlds.animals import AnimalSpec
from worlds.shapes import ShapeSpec

CAPTIONS = ["a red circle moving right", "a blue square moving up", "a large green triangle standing still"]


def tiny_generator(seed: int = 0, **changes) -> MaskGIT:
    torch.manual_seed(seed)
    text = TextEncoderConfig(vocab_size=300, dim=32, depth=1, heads=2, mlp=64, max_len=16)
    config = MaskGITConfig(codebook_size=16, latent_frames=3, grid=2, dim=32, depth=2, heads=2, mlp=64, text=text)
    return MaskGIT(MaskGITConfig(**(config.__dict__ | changes))).eval()


def tiny_tokenizer(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(VQGANConfig(widths=(8, 8, 8), codebook_size=16, code_dim=4)).eval()


@pytest.fixture(scope="module")
def text() -> CaptionTokenizer:
    return CaptionTokenizer.train(CAPTIONS * 3, vocab_size=300)


def test_loss_counts_only_masked_positions(text):
    model = tiny_generator(text_drop=0.0)
    codes = torch.randint(16, (4, 3, 2, 2))
    ids, mask = text.encode(CAPTIONS + CAPTIONS[:1], 16)
    torch.manual_seed(1)
    loss = model(codes, ids, mask)
    torch.manual_seed(1)  # replay the same draws by hand
    tokens, masked = model.mask_positions(codes)
    assert (tokens.flatten(1) == model.mask_id).equal(masked)  # masked inputs are exactly the scored ones
    logits = model.logits(tokens, model.encode_text(ids, mask), mask).flatten(1, 3)  # (B, N, K)
    on_masked = F.cross_entropy(logits[masked], codes.flatten(1)[masked])
    on_all = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
    torch.testing.assert_close(loss, on_masked)
    assert not torch.isclose(loss, on_all)


def test_motion_weight_counts_the_codes_that_change_from_the_frame_before_that_many_times(text):
    model = tiny_generator(text_drop=0.0)
    codes = torch.randint(16, (4, 3, 2, 2))
    codes[:, 1] = codes[:, 0]  # latent frame 1 repeats frame 0; frame 2 moves (wherever it differs from frame 1)
    moved = torch.zeros_like(codes, dtype=torch.bool)
    moved[:, 2] = codes[:, 2] != codes[:, 1]
    ids, mask = text.encode(CAPTIONS + CAPTIONS[:1], 16)
    torch.manual_seed(1)
    loss = model(codes, ids, mask, motion_weight=4.0)
    torch.manual_seed(1)  # replay the same draws by hand
    tokens, masked = model.mask_positions(codes)
    logits = model.logits(tokens, model.encode_text(ids, mask), mask).flatten(1, 3)  # (B, N, K)
    ce = F.cross_entropy(logits[masked], codes.flatten(1)[masked], reduction="none")
    weight = 1 + 3 * moved.flatten(1)[masked].float()
    assert 0 < moved.flatten(1)[masked].sum() < masked.sum()  # both kinds are scored
    torch.testing.assert_close(loss, (ce * weight).sum() / weight.sum())
    assert not torch.isclose(loss, ce.mean())
    torch.manual_seed(1)
    torch.testing.assert_close(model(codes, ids, mask, motion_weight=1.0), ce.mean())  # 1: the plain mean


def test_an_image_masks_only_its_first_frame_codes():
    model = tiny_generator()
    codes = torch.randint(16, (64, 3, 2, 2))
    frames = torch.tensor([1, 3]).repeat(32)  # images and videos in one batch
    tokens, masked = model.mask_positions(codes, frames)
    time = torch.arange(3).repeat_interleave(4)  # (N,) latent frame of each position
    assert not masked[frames == 1][:, time > 0].any()  # nothing beyond an image's one frame is scored
    assert masked[frames == 1].any() and masked[frames == 3][:, time > 0].any()
    assert (tokens.flatten(1)[frames == 1][:, time > 0] == model.mask_id).all()  # padding is [MASK], unattended


def test_schedule_is_monotone_and_decoding_leaves_nothing_masked(text):
    r = torch.linspace(0, 1, 101)
    gamma = mask_ratio(r)
    assert gamma[0] == 1 and gamma[-1] < 1e-6 and (gamma[1:] <= gamma[:-1]).all()
    model = tiny_generator()
    ids, mask = text.encode(CAPTIONS, 16)
    open_counts = []
    codes = model.generate(ids, mask, steps=5, generator=torch.Generator().manual_seed(0),
                           on_step=lambda s, n: open_counts.append(s))
    assert codes.shape == (3, 3, 2, 2) and open_counts == [1, 2, 3, 4, 5]
    assert ((codes >= 0) & (codes < 16)).all()  # no [MASK] (id 16) left


def test_codes_drawn_near_temperature_zero_are_the_most_likely(text):
    """code_temperature sharpens the draw of each code: near 0 it takes the argmax; at 1 it draws."""
    model = tiny_generator()
    ids, mask = text.encode(CAPTIONS, 16)
    given = torch.full((3, 3, 2, 2), -1)
    given[:, :2] = torch.randint(16, (3, 2, 2, 2))
    # one step decides the last latent frame's 12 codes at once, from one prediction
    cond = (model.encode_text(ids, mask), mask)
    empty = torch.full((1, 1), BOS)
    uncond = (model.encode_text(empty, empty > 0), empty > 0)
    with torch.no_grad():
        tokens = given.masked_fill(given < 0, model.mask_id)
        likeliest = model.guided_logits(tokens, cond, uncond, CFG).argmax(-1)[:, 2]
    for seed in range(3):
        sharp = model.generate(ids, mask, given=given, steps=3, code_temperature=1e-3,
                               generator=torch.Generator().manual_seed(seed))
        assert sharp[:, 2].equal(likeliest)
    drawn = model.generate(ids, mask, given=given, steps=3, generator=torch.Generator().manual_seed(0))
    assert not drawn[:, 2].equal(likeliest), "at 1 the codes are drawn, not the argmax"


def test_given_codes_never_change(text):
    model = tiny_generator()
    ids, mask = text.encode(CAPTIONS, 16)
    given = torch.full((3, 3, 2, 2), -1)
    given[:, :2] = torch.randint(16, (3, 2, 2, 2))  # the first two latent frames are known
    codes = model.generate(ids, mask, given=given, steps=4, temperature=10.0, generator=torch.Generator().manual_seed(0))
    assert codes[:, :2].equal(given[:, :2]) and (codes[:, 2] >= 0).all()


def test_guidance_scale_zero_is_the_unconditional_prediction(text):
    model = tiny_generator()
    ids, mask = text.encode(CAPTIONS, 16)
    tokens = torch.randint(17, (3, 3, 2, 2))
    empty_ids, empty_mask = text.encode([""], 16)  # [BOS] alone
    cond = (model.encode_text(ids, mask), mask)
    uncond = (model.encode_text(empty_ids, empty_mask), empty_mask)
    with torch.no_grad():
        plain_uncond = model.logits(tokens, uncond[0].expand(3, -1, -1), uncond[1].expand(3, -1))
        torch.testing.assert_close(model.guided_logits(tokens, cond, uncond, 0.0), plain_uncond, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.guided_logits(tokens, cond, uncond, 1.0), model.logits(tokens, *cond))
        assert not torch.allclose(plain_uncond, model.logits(tokens, *cond), atol=1e-3)  # the text does matter
        plain_cond = model.logits(tokens, *cond)  # above 1 the guidance extrapolates away from the unconditional
        torch.testing.assert_close(model.guided_logits(tokens, cond, uncond, 3.0),
                                   plain_uncond + 3 * (plain_cond - plain_uncond), atol=1e-4, rtol=1e-4)


def test_text_tokenizer_round_trips_and_knows_what_it_saw(text):
    for sentence in CAPTIONS + ["a dog running", "ünïcode and 🐕 survive"]:
        ids, mask = text.encode([sentence], 64)
        assert mask.all() and text.decode(ids[0]) == sentence.lower()  # byte-level: nothing is [UNK]
    assert text.unseen("a red dog running") == ["dog", "running"]
    restored = CaptionTokenizer.from_json(text.to_json())
    torch.testing.assert_close(restored.encode(CAPTIONS, 16), text.encode(CAPTIONS, 16))


def test_special_tokens_typed_in_a_caption_are_plain_text(text):
    ids, mask = text.encode(["a red [PAD] circle [BOS]", "a red circle"], 16)
    assert ids[0, 0] == BOS and not ((ids[0, 1:] == PAD) | (ids[0, 1:] == BOS)).any()  # the typed ones are bytes
    assert mask[0].all() and mask[1].sum() == (ids[1] != PAD).sum()  # no hole; padding only at the end
    restored = CaptionTokenizer.from_json(text.to_json())
    assert restored.encode(["[PAD]"], 16)[0].equal(text.encode(["[PAD]"], 16)[0])


def test_story_of_two_prompts_has_the_expected_length(text):
    model, tokenizer = tiny_generator(), tiny_tokenizer()
    prompts = [text.encode([c], 16) for c in CAPTIONS[:2]]
    video = make_video(model, tokenizer, prompts, [5, 7], steps=2, generator=torch.Generator().manual_seed(0))
    assert video.shape == (1, 3, 12, 16, 16)  # window 5 frames; 7 needs two shifts of 2 (t - k) frames
    init = torch.rand(1, 3, 1, 16, 16) * 2 - 1  # continue an image
    video = make_video(model, tokenizer, prompts[:1], [8], init=init, steps=2, generator=torch.Generator().manual_seed(0))
    assert video.shape[2] == 9 and video[:, :, :1].equal(init)


def test_draw_follows_the_probabilities_and_never_picks_an_impossible_code():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]]).repeat(20_000, 1)  # (40000, 4)
    picks = draw(probs, torch.Generator().manual_seed(0)).squeeze(1)
    shares = torch.bincount(picks[0::2], minlength=4).float() / 20_000
    torch.testing.assert_close(shares, probs[0], atol=0.01, rtol=0)
    assert (picks[1::2] == 3).all()


def test_a_continuation_window_takes_steps_in_proportion_to_its_unknown_codes(text):
    model = tiny_generator()
    ids, mask = text.encode(CAPTIONS[:1], 16)
    calls = []
    given = torch.full((1, 3, 2, 2), -1)
    model.generate(ids, mask, steps=12, on_step=lambda s, n: calls.append(n))
    given[:, :2] = 0  # two of three latent frames known: a third of the codes to generate
    model.generate(ids, mask, given=given, steps=12, on_step=lambda s, n: calls.append(n))
    assert calls == [12] * 12 + [4] * 4


def test_a_cut_to_the_next_prompt_gives_keep_at_cut_latent_frames():
    """Within a prompt the context is `keep` latent frames (5 frames of an 11-frame window by default), and
    at a cut to the next prompt too, unless `keep_at_cut` says otherwise (1: the last frame alone)."""
    assert list(plan_windows(6, None, [11, 10])) == [(0, 0, 11), (1, 5, 6), (1, 5, 4)]
    assert list(plan_windows(6, None, [11, 10, 10], keep_at_cut=1)) == [(0, 0, 11), (1, 1, 10), (2, 1, 10)]
    assert list(plan_windows(6, None, [21], keep_at_cut=1)) == [(0, 0, 11), (0, 5, 6), (0, 5, 4)]  # no cut
    assert list(plan_windows(6, 2, [11, 12], keep_at_cut=2)) == [(0, 0, 11), (1, 3, 8), (1, 3, 4)]
    assert list(plan_windows(6, None, [4], have=7, keep_at_cut=1)) == [(0, 5, 4)]  # continuing --init is no cut


def test_the_plan_of_any_length_is_made_a_window_at_a_time():
    """A long video is planned as it is made, a window when asked for (a list of every window
    would grow with the length), and a window of one latent frame, which could never shift, is
    refused instead of looping."""
    plan = plan_windows(6, None, [10 ** 6])
    assert [next(plan), next(plan)] == [(0, 0, 11), (0, 5, 6)]
    with pytest.raises(ValueError, match="at least 2"):
        next(plan_windows(1, None, [3]))


def test_windows_that_continue_frames_sample_at_the_context_temperature(text):
    """A fresh window takes the temperature asked for; a window after a cut or a shift CONTEXT_TEMPERATURE."""
    model, tokenizer = tiny_generator(), tiny_tokenizer()
    seen, generate = [], model.generate
    model.generate = lambda *a, **kw: seen.append(kw["temperature"]) or generate(*a, **kw)
    prompts = [text.encode([c], 16) for c in CAPTIONS[:2]]
    make_video(model, tokenizer, prompts, [5, 6], steps=1, temperature=3.0)  # a fresh window, a cut, a shift
    make_video(model, tokenizer, prompts, [5, 6], steps=1, temperature=3.0, context_temperature=None)
    assert seen == [3.0, 1.0, 1.0, 3.0, 3.0, 3.0]


def whole_video_reference(model, tokenizer, prompts, frames, init=None, keep=None, keep_at_cut=None,
                          context_temperature=CONTEXT_TEMPERATURE, temperature=TEMPERATURE, **sampling) -> torch.Tensor:
    """The straightforward way, for comparison: keep the whole video and cut each context from it."""
    t = model.config.latent_frames
    out = [] if init is None else [init]
    for segment, context, new in plan_windows(t, keep, frames, 0 if init is None else init.shape[2], keep_at_cut):
        ids, mask = prompts[segment]
        given, noise = None, temperature
        if context:
            known = tokenizer.encode(torch.cat(out, dim=2)[:, :, -context:])
            given = F.pad(known, (0, 0, 0, 0, 0, t - known.shape[1]), value=-1)
            noise = temperature if context_temperature is None else context_temperature
        out.append(tokenizer.decode(model.generate(ids, mask, given=given, temperature=noise, **sampling))[
            :, :, context:context + new])
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("keep, keep_at_cut, context_temperature, frames, init_frames",
                         [(None, 1, 1.0, [9], 0), (1, 1, 1.0, [4, 6], 0), (2, 1, 1.0, [7], 3),
                          (None, 1, 1.0, [3, 3, 3], 1), (2, None, None, [5, 6], 0)])
def test_streamed_video_equals_the_whole_video_way(text, keep, keep_at_cut, context_temperature, frames, init_frames):
    model, tokenizer = tiny_generator(), tiny_tokenizer()
    prompts = [text.encode([c, c], 16) for c in CAPTIONS[:len(frames)]]  # a batch of two
    init = torch.rand(2, 3, init_frames, 16, 16) * 2 - 1 if init_frames else None
    sampling = dict(keep=keep, keep_at_cut=keep_at_cut, context_temperature=context_temperature, steps=2, cfg=1.5)
    want = whole_video_reference(model, tokenizer, prompts, frames, init, generator=torch.Generator().manual_seed(0),
                                 **sampling)
    pieces = list(stream_video(model, tokenizer, prompts, frames, init, generator=torch.Generator().manual_seed(0),
                               **sampling))
    got = torch.cat(([] if init is None else [init]) + pieces, dim=2)
    assert got.shape == (2, 3, init_frames + sum(frames), 16, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(make_video(model, tokenizer, prompts, frames, init, generator=torch.Generator().manual_seed(0),
                                          **sampling), want, rtol=0, atol=0)


def live_tensor_bytes() -> int:
    return sum(o.untyped_storage().nbytes() for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))


def test_streaming_memory_does_not_grow_with_the_length(text):
    """What stream_video holds between windows is the same for 4 windows and for 20: one window of
    context, never the video so far."""
    model, tokenizer = tiny_generator(), tiny_tokenizer()
    prompts = [text.encode(CAPTIONS[:1], 16)]
    held = {}
    for windows in (4, 20):
        peak = 0
        for piece in stream_video(model, tokenizer, prompts, [1 + 2 * windows], keep=1, steps=1):
            del piece  # the caller writes it out and lets it go
            peak = max(peak, live_tensor_bytes())
        held[windows] = peak
    assert held[20] == held[4]


def overfit(world, specs: list, steps: int) -> float:
    """Memorise one clip of each spec (rendered in `world`, coded by its shipped tokenizer) with a small
    generator; sample from each caption and return the share of codes given back. The judge of the world
    must read every sampled clip as its spec."""
    tokenizer, _ = load_tokenizer(shipped(world.__name__.split(".")[-1], "tokenizer"))
    render = {shapes: shapes.render_shapes, animals: animals.render}[world]
    clips = np.stack([render(s, 11, 64, np.random.default_rng(i)) for i, s in enumerate(specs)])
    video = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (B, 3, 11, 64, 64)
    codes = tokenizer.encode(video)  # (B, 6, 8, 8)
    captions = [world.caption(s) for s in specs]
    text = CaptionTokenizer.train(captions, vocab_size=300)
    torch.manual_seed(0)
    config = MaskGITConfig(codebook_size=tokenizer.quantizer.codebook.shape[0],
                           latent_frames=6, grid=8, dim=64, depth=2, heads=4, mlp=128, text_drop=0.0,
                           text=TextEncoderConfig(vocab_size=300, dim=32, depth=1, heads=2, mlp=64, max_len=16))
    model = MaskGIT(config)
    ids, mask = text.encode(captions, 16)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(steps):
        loss = model(codes, ids, mask)
        loss.backward(), opt.step(), opt.zero_grad()
    model.eval()
    sampled = model.generate(ids, mask, steps=8, cfg=1.0, temperature=1.0, generator=torch.Generator().manual_seed(0))
    for clip, spec in zip(tokenizer.decode(sampled), specs):
        assert all(world.agreement(clip, spec).values()), spec
    return (sampled == codes).float().mean().item()


def test_tiny_generator_overfits_captioned_clips_and_the_oracle_agrees():
    """Memorise four captioned Shapes clips; sampling from each caption must give its clip back."""
    specs = [ShapeSpec("red", "circle", "large", "right"), ShapeSpec("blue", "square", "large", "up"),
             ShapeSpec("green", "triangle", "large", "down"), ShapeSpec("yellow", "square", "small", "left")]
    assert overfit(shapes, specs, steps=500) > 0.95  # measured: 72% of codes match after 300 steps, 99.9% after 500


def test_tiny_generator_overfits_animals_clips_and_the_judge_agrees():
    """The same in the Animals world: four subjects, each in another scene, action and direction."""
    specs = [AnimalSpec("dog", "brown", "running", "right", "on the grass"),
             AnimalSpec("cat", "black", "sitting", "left", "in the snow"),
             AnimalSpec("horse", "white", "walking", "left", "on the beach"),
             AnimalSpec("bird", "orange", "flying", "right", "at night")]
    assert overfit(animals, specs, steps=500) > 0.95  # measured: 98.9% of codes match after 300 steps, 99.9% after 500


def test_prefix_masks_keep_the_first_latent_frames_visible_and_never_score_them():
    model = tiny_generator(latent_frames=4)
    codes = torch.randint(16, (400, 4, 2, 2))
    time = torch.arange(4).repeat_interleave(4)  # (N,) latent frame of each position
    first_frame = {}
    for prefix in (0.0, 0.5, 1.0):
        torch.manual_seed(0)
        tokens, masked = model.mask_positions(codes, prefix=prefix)
        assert (tokens.flatten(1) == model.mask_id).equal(masked), "what is hidden is what is scored"
        first_frame[prefix] = masked[:, time == 0].float().sum(1).mean().item()  # masked codes of latent frame 0
        if prefix == 1.0:  # every sample keeps k in 1..t-1 latent frames: visible, unscored; masks only after
            k = torch.stack([time[row].min() for row in masked])  # (B,) the first masked latent frame
            assert set(k.tolist()) == {1, 2, 3}, "every prefix length 1..t-1 is drawn"
            for row, keep in zip(range(len(codes)), k.tolist()):
                assert tokens.flatten(1)[row, time < keep].equal(codes.flatten(1)[row, time < keep])
    assert first_frame[0.0] > 1 and first_frame[1.0] == 0
    assert 0.35 < first_frame[0.5] / first_frame[0.0] < 0.65, "about half the samples keep a prefix"
    images = torch.ones(400, dtype=torch.long)  # an image has no frame to keep: its one frame is masked as before
    _, image_masked = model.mask_positions(codes, images, prefix=1.0)
    assert image_masked.view(400, 4, 4)[:, 0].any(1).all() and not image_masked.view(400, 4, 4)[:, 1:].any()


def test_prefix_frames_gives_each_continuation_exactly_that_many_latent_frames():
    """prefix_frames=1: the subject's first latent frame given, everything after it to fill (the
    motion search's masks); a clip shorter than that keeps all but its last frame."""
    model = tiny_generator(latent_frames=4)
    codes = torch.randint(16, (400, 4, 2, 2))
    time = torch.arange(4).repeat_interleave(4)  # (N,) latent frame of each position
    torch.manual_seed(0)
    tokens, masked = model.mask_positions(codes, prefix=1.0, prefix_frames=1)
    assert not masked[:, time == 0].any(), "latent frame 0 is never scored, in any sample"
    assert tokens.flatten(1)[:, time == 0].equal(codes.flatten(1)[:, time == 0]), "and always given"
    # latent frame 1 is open in every sample: masked in most (1..3 at random: in a third at most)
    assert masked[:, time == 1].any(1).float().mean() > 0.6
    _, three = model.mask_positions(codes, prefix=1.0, prefix_frames=3)
    assert not three[:, time < 3].any() and three[:, time == 3].any(1).all()
    two = torch.full((400,), 2, dtype=torch.long)  # clips of two real latent frames: all but the last given
    _, short = model.mask_positions(codes, two, prefix=1.0, prefix_frames=3)
    assert not short.view(400, 4, 4)[:, 0].any() and short.view(400, 4, 4)[:, 1].any(1).all()
