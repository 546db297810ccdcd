import torch

from kit.config import TrainConfig
from kit.steps import DECAYED, Steps, adamw, step_seed
from maskgit import MaskGIT, MaskGITConfig
from text_encoder import TextEncoderConfig
from vqgan import VQGAN, VQGANConfig


def test_no_two_ranks_or_steps_share_a_seed():
    """8 ranks x 25,000 steps: every (rank, step) draws its own batch and masks. A seed made as
    seed·a + rank·b + step (b = 10,007 before) gives rank 1 at step 0 what rank 0 gets at step b."""
    seeds = {step_seed(0, rank, step) for rank in range(8) for step in range(25_000)}
    assert len(seeds) == 8 * 25_000
    assert step_seed(1, 0, 0) not in seeds and all(0 <= s < 2 ** 63 for s in list(seeds)[:1000])


def test_weight_decay_shrinks_layer_weights_only():
    """A step with zero gradients leaves only AdamW's decay: linear and conv weights shrink by lr·wd;
    biases, norms, embeddings, positions, the first frame and the codebook stay as they are."""
    cfg = TrainConfig(lr=0.1, weight_decay=0.5)
    for model in (MaskGIT(MaskGITConfig(codebook_size=16, latent_frames=2, grid=2, dim=16, depth=1, heads=2, mlp=32,
                                        text=TextEncoderConfig(vocab_size=50, dim=16, depth=1, heads=2, mlp=32))),
                  VQGAN(VQGANConfig(widths=(8, 8, 8), codebook_size=16, code_dim=4))):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = adamw(model, cfg)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        layers = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, DECAYED)}
        assert len(layers) > 3
        for name, p in model.named_parameters():
            factor = 1 - 0.1 * 0.5 if name in layers else 1.0
            torch.testing.assert_close(p.detach(), before[name] * factor, msg=name)


def test_the_cpu_steps_run_in_bf16_only_when_asked(tmp_path):
    """train.precision: "auto" and "fp32" keep the CPU in fp32 (bf16 crawls on CPUs without its
    instructions); "bf16" puts the CPU's matmuls under bf16 autocast."""
    cpu = torch.device("cpu")
    a = torch.ones(4, 4)
    for precision, dtype in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        steps = Steps(TrainConfig(precision=precision), str(tmp_path / precision), 0, 1, cpu, 0, 0)
        with steps.autocast:
            assert (a @ a).dtype == dtype, precision
