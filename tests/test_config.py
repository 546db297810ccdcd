import os
import subprocess
import sys

import pytest

from kit.config import configure, generator_preset, override, tokenizer_preset
from kit.faults import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_config_key_is_an_error():
    model_cfg, cfg = tokenizer_preset("tiny", "vqgan")
    with pytest.raises(UsageError, match="unknown config key"):
        override(cfg, ["train.learning_rate=1"], "train")
    assert override(cfg, ["train.lr=0.5"], "train").lr == 0.5
    assert override(model_cfg, ["model.widths=4,8,8"], "model").widths == (4, 8, 8)


def test_overrides_reach_the_nested_text_config_and_parse_by_type():
    model_cfg, cfg = configure(2, "tiny", "vqgan", ["model.text.depth=3", "train.max_steps=1e3", "model.dim=64"])
    assert model_cfg.text.depth == 3 and model_cfg.dim == 64 and model_cfg.text.dim == generator_preset("tiny")[0].text.dim
    assert cfg.max_steps == 1000 and isinstance(cfg.max_steps, int)
    with pytest.raises(UsageError, match="bad value 'fast' for train.lr"):
        configure(1, "tiny", "vqgan", ["train.lr=fast"])


@pytest.mark.parametrize("stage, key", [(2, "train.gan_start=0"), (2, "train.fold_cosine=0.9"),
                                        (1, "train.cache_clips=8"), (1, "train.image_ratio=0.2")])
def test_a_key_that_only_the_other_stage_reads_is_an_error(stage, key):
    with pytest.raises(UsageError, match=f"read by stage {3 - stage} only"):
        configure(stage, "tiny", "vqgan", [key])
    configure(3 - stage, "tiny", "vqgan", [key])  # the stage that reads it takes it


def test_the_cli_refuses_a_key_of_the_other_stage_in_one_line():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--stage", "1", "--set", "train.sample_steps=4"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "train.sample_steps is read by stage 2 only" in result.stderr


def test_the_position_scheme_is_a_checked_model_field_and_old_generators_load_with_absolute_positions():
    from kit.checkpoint import load_generator, shipped
    model_cfg, _ = configure(2, "tiny", "vqgan", ["model.position=rotary"])
    assert model_cfg.position == "rotary" and generator_preset("tiny")[0].position == "absolute"
    with pytest.raises(UsageError, match="model.position must be one of absolute, rotary"):
        configure(2, "tiny", "vqgan", ["model.position=sideways"])
    # the Shapes file was saved before the field existed: its config has no 'position'
    model, _, _, meta = load_generator(shipped("shapes", "generator"), shipped("shapes", "tokenizer"))
    assert "position" not in meta["config"] and model.config.position == "absolute"
    model, _, _, meta = load_generator(shipped("animals", "generator"), shipped("animals", "tokenizer"))
    assert model.config.position == "rotary"


def test_an_integer_field_takes_whole_numbers_only():
    assert configure(2, "tiny", "vqgan", ["train.max_steps=1e3"])[1].max_steps == 1000
    for bad in ("3e-1", "2.5", "1e400", "nan"):
        with pytest.raises(UsageError, match="train.batch_size"):
            configure(2, "tiny", "vqgan", [f"train.batch_size={bad}"])


def test_the_precision_is_a_checked_train_field():
    """fp16 is no choice (its matmuls overflow without a loss scaler, which train.py has not)."""
    assert configure(2, "tiny", "vqgan", ["train.precision=bf16"])[1].precision == "bf16"
    with pytest.raises(UsageError, match="train.precision must be one of auto, bf16, fp32"):
        configure(2, "tiny", "vqgan", ["train.precision=fp16"])


def test_the_cut_rules_and_world_names_sample_py_reads_are_the_worlds_own():
    """kit.config.KEEP_AT_CUT and kit.checkpoint.SHIPPED_WORLDS name what the worlds say, so that
    sample.py need not load a world to know them."""
    from kit.checkpoint import SHIPPED_WORLDS
    from kit.config import KEEP_AT_CUT
    from worlds import WORLDS
    assert KEEP_AT_CUT == {name: world.KEEP_AT_CUT for name, world in WORLDS.items()}
    assert sorted(SHIPPED_WORLDS) == sorted(WORLDS)
