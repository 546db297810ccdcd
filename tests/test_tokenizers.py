import pytest
import torch
import torch.nn.functional as F

from cvivit import CViViT, CViViTConfig
from evals.measures import psnr
from kit.stream import ClipStream
from quantizer import VectorQuantizer
from vqgan import VQGAN, VQGANConfig
from worlds.shapes import ShapesSource


def tiny(kind: str):
    torch.manual_seed(0)
    if kind == "vqgan":
        return VQGAN(VQGANConfig(widths=(16, 32, 32), codebook_size=64, code_dim=8))
    return CViViT(CViViTConfig(dim=32, spatial_depth=1, temporal_depth=1, heads=2, mlp=64, image_size=32,
                               codebook_size=64, code_dim=8))


KINDS = ["vqgan", "cvivit"]


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_of_codes_and_reconstruction(kind):
    model = tiny(kind).eval()
    video = torch.rand(2, 3, 7, 32, 32) * 2 - 1
    codes = model.encode(video)
    assert codes.shape == (2, 4, 4, 4) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 64
    assert model.decode(codes).shape == video.shape
    image = video[:, :, :1]  # an image is a one-frame video
    assert model.encode(image).shape == (2, 1, 4, 4)
    assert model.decode(model.encode(image)).shape == image.shape


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_is_causal_in_time(kind):
    """The first k latent frames depend only on the first 1 + 2(k - 1) frames."""
    model = tiny(kind).eval()
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    for k in (1, 2, 3):
        changed = video.clone()
        changed[:, :, 1 + 2 * (k - 1):] = torch.rand_like(changed[:, :, 1 + 2 * (k - 1):])
        a, b = model.encode_latent(video), model.encode_latent(changed)
        torch.testing.assert_close(a[:, :k], b[:, :k])
        assert not torch.allclose(a[:, k:], b[:, k:])  # the change is visible where it may be
        assert torch.equal(model.encode(video)[:, :k], model.encode(changed)[:, :k])


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_is_causal_in_time(kind):
    """Frames made from the first k latent frames do not change when later codes do."""
    model = tiny(kind).eval()
    codes = torch.randint(0, 64, (1, 5, 4, 4))
    later = codes.clone()
    later[:, 2:] = torch.randint(0, 64, (1, 3, 4, 4))
    a, b = model.decode(codes), model.decode(later)
    torch.testing.assert_close(a[:, :, :3], b[:, :, :3])  # latent frames 0, 1 make frames 0..2
    assert not torch.allclose(a[:, :, 3:], b[:, :, 3:])


@pytest.mark.parametrize("kind", KINDS)
def test_straight_through_gradient_reaches_the_encoder(kind):
    model = tiny(kind).train()
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    out = model(video)
    F.mse_loss(out.recon, video).backward()  # the reconstruction loss alone, not the VQ loss
    first = model.stem.conv.weight if kind == "vqgan" else model.embed_first.weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert model.quantizer.proj_in.weight.grad.abs().sum() > 0


def test_commitment_weight_sits_on_the_encoder_term():
    """loss = ||sg(z) - q||^2 + beta ||z - sg(q)||^2: the encoder side gets beta times the pull."""
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=8, code_dim=4, beta=0.25)
    vq.initialised.fill_(True)
    x = torch.randn(1, 16, 4)
    z = F.normalize(vq.proj_in(x), dim=-1).reshape(16, 4).detach().requires_grad_(True)
    codes = vq.lookup(z)
    q = F.normalize(vq.codebook, dim=-1)[codes]
    loss = F.mse_loss(q, z.detach()) + vq.beta * F.mse_loss(z, q.detach())
    loss.backward()
    expected = 0.25 * 2 * (z - q).detach() / z.numel()
    torch.testing.assert_close(z.grad, expected)
    out = vq(x)  # the module computes the same loss value
    torch.testing.assert_close(out.loss, loss.detach(), atol=1e-6, rtol=1e-5)


def test_kmeans_initialisation_moves_the_codebook_onto_the_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=8, codebook_size=16, code_dim=4, beta=0.25).train()
    before = vq.codebook.detach().clone()
    x = torch.randn(4, 64, 8)
    vq(x)
    assert bool(vq.initialised)
    assert not torch.allclose(before, vq.codebook)
    z = F.normalize(vq.proj_in(x), dim=-1).reshape(-1, 4)
    cosine_to_nearest = (z @ F.normalize(vq.codebook, dim=-1).t()).max(dim=1).values
    random_cosine = (z @ F.normalize(before, dim=-1).t()).max(dim=1).values
    assert cosine_to_nearest.mean() > random_cosine.mean()  # codes now sit among the data


def test_dead_codes_restart_from_recent_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=8, codebook_size=16, code_dim=4, beta=0.25).train()
    vq.initialised.fill_(True)  # skip k-means so that most codes stay unused
    with torch.no_grad():
        vq.codebook[1:] = -vq.codebook[0]  # every input picks code 0 or nothing near the rest
        vq.proj_in.weight.zero_(), vq.proj_in.bias.copy_(F.normalize(vq.codebook[0], dim=0))
    vq(torch.randn(2, 32, 8))
    assert vq.counts[0] == 64 and vq.counts[1:].sum() == 0
    before = vq.codebook.detach().clone()
    restarted = vq.restart_dead_codes()
    assert restarted.tolist() == list(range(1, 16))
    torch.testing.assert_close(vq.codebook[0], before[0])  # a used code stays
    assert not torch.allclose(vq.codebook[1:], before[1:])
    pool = vq.pool[: int(vq.pool_filled)]
    nearest = (F.normalize(vq.codebook[1:], dim=-1) @ pool.t()).max(dim=1).values
    assert (nearest > 0.99).all()  # each restarted code is (a jittered copy of) an encoder output
    assert vq.counts.sum() == 0


@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_decoding_gives_the_frames_of_one_full_pass(chunk):
    torch.manual_seed(0)
    model = tiny("vqgan").eval()
    codes = torch.randint(model.config.codebook_size, (2, 7, 2, 2))  # 7 latent frames: 13 video frames
    streamed = torch.cat(list(model.decode_stream(codes, chunk)), dim=2)
    torch.testing.assert_close(streamed, model.decode(codes), atol=1e-5, rtol=1e-5)
    assert all(conv.past is None for conv in model.modules() if hasattr(conv, "past"))  # streaming is off again


def test_merging_folds_near_copies_into_the_most_used_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=8, codebook_size=6, code_dim=4, beta=0.25).eval()
    e = torch.eye(4)
    with torch.no_grad():  # codes 0, 2, 4 are near-copies of e0; 1 and 3 of e1; 5 is e2 alone
        vq.codebook.copy_(torch.stack([e[0], e[1], e[0], e[1], e[0], e[2]]) + 0.05 * torch.randn(6, 4))
    left = vq.merge_near_duplicates(torch.tensor([1.0, 5, 9, 0, 2, 3]), threshold=0.95)
    assert left == 3
    assert vq.alias.tolist() == [2, 1, 2, 1, 2, 5]  # each group is owned by its most used code
    assert vq.lookup(e[:3]).tolist() == [2, 1, 5]  # the encoder only ever emits owners
    torch.testing.assert_close(vq.code_vectors(torch.tensor([0, 4])), vq.code_vectors(torch.tensor([2, 2])))
    # a file saved before merging existed loads with every code standing for itself
    old = {k: v for k, v in vq.state_dict().items() if k != "alias"}
    fresh = VectorQuantizer(dim=8, codebook_size=6, code_dim=4, beta=0.25)
    fresh.load_state_dict(old)
    assert fresh.alias.tolist() == list(range(6))


@pytest.mark.parametrize("kind,lr,steps", [("vqgan", 1e-3, 300), ("cvivit", 3e-3, 500)])
def test_tiny_tokenizer_overfits_one_batch(kind, lr, steps):
    """Measured: about 27 dB (vqgan) and 25.5 dB (cvivit) after these steps; an untrained model gives 5."""
    torch.manual_seed(0)
    model = tiny(kind).train()
    video = ClipStream(ShapesSource(frames=5, size=32, seed=3), 4).batch(0)["video"]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        out = model(video)
        (F.mse_loss(out.recon, video) + out.vq_loss).backward()
        opt.step()
        opt.zero_grad()
        if step % 25 == 0:
            model.quantizer.restart_dead_codes()
    model.eval()
    before = psnr(tiny(kind).eval().decode(tiny(kind).eval().encode(video)), video).mean()
    after = psnr(model.decode(model.encode(video)), video).mean()
    assert before < 15 and after > 23, (before, after)


def test_perceptual_loss_loads_vgg16_weights_from_a_file(tmp_path):
    """The VGG16 layout (`features.{i}.weight`) loads strictly; identical videos cost nothing."""
    from safetensors.torch import load_file, save_file

    from vqgan import VGGPerceptual
    torch.manual_seed(0)
    weights = {k: torch.randn_like(v) * 0.05 for k, v in VGGPerceptual().state_dict().items() if k.startswith("features.")}
    assert "features.0.weight" in weights and "features.28.weight" in weights  # conv1_1 ... conv5_3
    save_file(weights, str(tmp_path / "vgg16.safetensors"))
    net = VGGPerceptual()
    net.load_state_dict(load_file(str(tmp_path / "vgg16.safetensors")))  # strict by default
    a = torch.rand(1, 3, 1, 32, 32) * 2 - 1
    assert net(a, a).item() == 0
    assert net(a, a.flip(-1)).item() > 0


class MatmulSpy(torch.Tensor):
    """A tensor that notes, at each matmul it takes part in, whether TF32 was allowed."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm"):
            cls.seen.append(torch.backends.cuda.matmul.allow_tf32)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_code_lookup_and_kmeans_run_in_true_fp32_where_tf32_is_on():
    # Set by hand, not with monkeypatch: the flag lives behind the cuBLAS module's __getattr__, which
    # some pytest versions cannot undo.
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py sets it on CUDA
    try:
        vq = VectorQuantizer(dim=8, codebook_size=16, code_dim=4, beta=0.25)
        z = F.normalize(torch.randn(64, 4), dim=-1).as_subclass(MatmulSpy)
        MatmulSpy.seen.clear()
        vq.kmeans_init(z)
        vq.lookup(z)
        assert MatmulSpy.seen and not any(MatmulSpy.seen)  # every distance matmul ran without TF32
        assert torch.backends.cuda.matmul.allow_tf32  # and the setting is back afterwards
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("norm", ["frame", "position"])
def test_position_norm_makes_a_code_depend_on_its_neighbourhood_alone(norm):
    """Inverting a corner of the later frames moves the far latents under per-frame GroupNorm (its statistics
    cover the whole frame) and leaves them exactly as they were under the per-pixel norm."""
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(widths=(8, 16, 16), codebook_size=32, code_dim=4, norm=norm)).eval()
    video = torch.rand(1, 3, 5, 128, 128) * 2 - 1
    changed = video.clone()
    changed[:, :, 3:, :8, :8] *= -1
    with torch.no_grad():
        far = [model.encode_latent(v)[:, :, 8:, 8:] for v in (video, changed)]  # 8 or more codes from the corner
    moved = (far[0] - far[1]).abs().max().item()
    assert (moved == 0.0) if norm == "position" else (moved > 1e-3)


def test_a_norm_is_read_from_the_file_and_a_file_without_one_keeps_the_frame_norm():
    from kit.checkpoint import load_tokenizer, shipped
    from kit.checkpoint import checked_config
    from kit.faults import UsageError
    assert load_tokenizer(shipped("animals", "tokenizer"))[0].config.norm == "frame"
    assert checked_config(VQGANConfig, '{"norm": "position"}', "f").norm == "position"
    with pytest.raises(UsageError, match="norm must be one of frame, position"):
        checked_config(VQGANConfig, '{"norm": "pixel"}', "f")
