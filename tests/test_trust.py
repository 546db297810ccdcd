"""A checkpoint is data: crafted metadata ends in one line and exit code 2, in bounded memory, and a fuzz of
hundreds of metadata mutations of a small tokenizer and generator either loads or is refused that way.
The fuzz runs in a child process (this file run as a script) so that its peak memory is its own."""

import json
import os
import resource
import subprocess
import sys

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kit.checkpoint import shipped  # noqa: E402  (the path above comes first when run as a script)


def edited(src: str, dst: str, edit) -> str:
    """A copy of the checkpoint `src` whose metadata is edit(meta) and whose tensors are unchanged."""
    with safe_open(src, framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(src), dst, metadata=edit(dict(meta)))
    return dst


def with_config(**changes):
    def edit(meta):
        config = json.loads(meta["config"])
        for key, value in changes.items():
            *path, last = key.split("__")
            node = config
            for part in path:
                node = node[part]
            node[last] = value
        return meta | {"config": json.dumps(config)}
    return edit


CRAFTED = {  # the rows of the table, on the shipped Animals generator
    "wide": with_config(dim=10 ** 6, mlp=10 ** 7),
    "deep": with_config(depth=10 ** 6),
    "bpe": lambda meta: meta | {"text_tokenizer": json.dumps({"bpe": "xxxxxxxxxx"})},
    "not json": lambda meta: meta | {"config": "{not json"},
}


def cap_memory():  # the child may reserve 6 GB of address space at most: an allocation beyond fails loudly
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))


@pytest.mark.parametrize("row", list(CRAFTED))
def test_crafted_metadata_is_one_line_and_exit_2_in_bounded_memory(row, tmp_path):
    path = edited(shipped("animals", "generator"), str(tmp_path / "gen.safetensors"), CRAFTED[row])
    result = subprocess.run([sys.executable, "sample.py", "a dog running", "--checkpoint", path, "--steps", "1",
                             "--out", str(tmp_path / "x.png")], capture_output=True, text=True, cwd=ROOT,
                            timeout=120, preexec_fn=cap_memory)
    assert result.returncode == 2, result.stderr[-300:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr and path in result.stderr
    assert not os.path.exists(tmp_path / "x.png")


def test_a_train_state_with_crafted_groups_or_moments_is_refused_in_one_line(tmp_path):
    """--resume reads the optimizer's groups and moments from the file: each is checked against the model."""
    import torch
    from kit.runs import restore_optimizer
    from kit.faults import UsageError
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    groups = json.dumps(opt.state_dict()["param_groups"])
    good = {"opt.0.exp_avg": torch.zeros(2, 3), "opt.0.exp_avg_sq": torch.zeros(2, 3), "opt.0.step": torch.tensor(1.0)}
    restore_optimizer(opt, good, groups, "opt")
    for tensors, groups_json, message in [
            (good | {"opt.0.exp_avg": torch.zeros(10 ** 3, 3)}, groups, "is (1000, 3), its parameter (2, 3)"),
            (good | {"opt.9.exp_avg": torch.zeros(2, 3)}, groups, "no state of the opt optimizer"),
            (good, "[{", "groups are not readable"),
            (good, json.dumps([{"params": [0, 1, 2]}]), "groups hold [3] parameters")]:
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            restore_optimizer(opt, tensors, groups_json, "opt")


def test_hundreds_of_metadata_mutations_load_or_are_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)  # the counts and peak memory, for the closing note (pytest -s shows them)
    assert report["mutations"] >= 200 and not report["failures"], report["failures"][:5]
    assert report["loaded"] > 10 and report["refused"] > 100  # both outcomes occur
    assert report["peak_kb"] <= 1.5 * report["clean_kb"]


# ----------------------------------------------------------------------------- the fuzz, run as a child

def mutations(meta: dict[str, str], stage: str) -> list[tuple[str, dict]]:
    """(name, mutated metadata) pairs: config numbers scaled by 10^k, zero, negative, fractional, strings;
    keys missing or added; wrong kind, stage, step and format; JSON cut short; the caption tokenizer altered."""
    config = json.loads(meta["config"])
    out = []
    numbers = [(k, v) for k, v in config.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    numbers += [(f"text__{k}", v) for k, v in config.get("text", {}).items() if isinstance(v, (int, float))]
    for key, value in numbers:
        for name, new in [("x10^2", value * 100), ("x10^6", value * 10 ** 6), ("zero", 0), ("negative", -abs(value) - 1),
                          ("float", value + 0.5), ("string", str(value)), ("null", None), ("list", [value])]:
            out.append((f"{key}={name}", with_config(**{key: new})(dict(meta))))
    for key in config:
        out.append((f"drop {key}", meta | {"config": json.dumps({k: v for k, v in config.items() if k != key})}))
    out.append(("added key", meta | {"config": json.dumps(config | {"extra": 1})}))
    for n in (0, 1, 5, len(meta["config"]) // 2, len(meta["config"]) - 1):
        out.append((f"config cut at {n}", meta | {"config": meta["config"][:n]}))
    out += [("config a list", meta | {"config": "[1, 2]"}), ("config null", meta | {"config": "null"})]
    for key in ("kind", "stage", "step", "format", "config", "train_config"):
        for value in ("", "cvivit", "2" if stage == "1" else "1", "-3", "1e9", "{}", "9" * 40):
            out.append((f"{key}={value[:8]}", meta | {key: value}))
        out.append((f"no {key}", {k: v for k, v in meta.items() if k != key}))
    train = meta.get("train_config", "{}")
    out += [("train_config cut", meta | {"train_config": train[:len(train) // 2]}),
            ("train_config odd field", meta | {"train_config": json.dumps(json.loads(train) | {"batch_size": "x"})})]
    # fields each in range but not together (item 8 of issue 30), and numbers that are no numbers (item 9)
    if stage == "1":
        out += [("widths two", with_config(widths=[8, 16])(dict(meta))),
                ("widths no groups", with_config(widths=[3, 16, 16])(dict(meta)))]
    else:
        out += [("heads 3", with_config(heads=3)(dict(meta))), ("text heads 5", with_config(text__heads=5)(dict(meta)))]
    out += [("step superscript", meta | {"step": "\u00b2"}), ("train_config deep", meta | {"train_config": "[" * 100000})]
    for field, value in (("image_size", 4096), ("image_size", 12), ("fps", 0), ("frames", 0), ("frames", 4),
                         ("lr", -1), ("ema", 3), ("grad_clip", -1), ("seed", 2 ** 70), ("fold_cosine", -1)):
        record = json.loads(train) | {field: value}
        out.append((f"train {field}={value}", meta | {"train_config": json.dumps(record)}))
    # issue 46: a brace pattern of 10^11 names (read as data, never expanded by a load), sizes each in range but
    # too large together
    huge = {"batch_size": 4096, "frames": 129, "image_size": 512}
    out += [("train brace pattern", meta | {"train_config": json.dumps(json.loads(train) | {"data": "x-{0..99999999999}"})}),
            ("train batch too large", meta | {"train_config": json.dumps(json.loads(train) | huge)})]
    if stage == "2":
        out += [("grid 64", with_config(grid=64)(dict(meta))), ("window 24", with_config(latent_frames=24)(dict(meta)))]
        text = meta["text_tokenizer"]
        fields = json.loads(text)
        out += [("tokenizer cut", meta | {"text_tokenizer": text[:len(text) // 2]}),
                ("tokenizer bpe junk", meta | {"text_tokenizer": json.dumps(fields | {"bpe": "xxxxxxxxxx"})}),
                ("tokenizer no words", meta | {"text_tokenizer": json.dumps({"bpe": fields["bpe"]})}),
                ("tokenizer a list", meta | {"text_tokenizer": "[]"}),
                ("no tokenizer", {k: v for k, v in meta.items() if k != "text_tokenizer"}),
                ("sha256 other", meta | {"tokenizer_sha256": "0" * 64})]
        # issue 46: BPE ids past the text encoder's table, a text table below the BPE's minimum, a one-frame window
        bpe = json.loads(fields["bpe"])
        word = max(bpe["model"]["vocab"], key=bpe["model"]["vocab"].get)
        bpe["model"]["vocab"][word] = 5000
        one_frame = json.dumps(json.loads(train) | {"frames": 1})
        out += [("tokenizer id past the table", meta | {"text_tokenizer": json.dumps(fields | {"bpe": json.dumps(bpe)})}),
                ("text vocab 64", with_config(text__vocab_size=64)(dict(meta))),
                ("window 1", with_config(latent_frames=1)(dict(meta)) | {"train_config": one_frame})]
    return out


def tensor_mutations(tensors: dict) -> list[tuple[str, dict]]:
    """(name, tensors) pairs whose integer tensors index outside what they index (item 9 of issue 30)."""
    out = []
    for key, value in tensors.items():
        if key.endswith("quantizer.alias"):
            for name, bad in (("5000", 5000), ("-1", -1)):
                changed = value.clone()
                changed[0] = bad
                out.append((f"{key}={name}", tensors | {key: changed}))
    return out


def fuzz(folder: str) -> dict:
    import gc
    import torch
    from kit.checkpoint import generator_meta, load_generator, load_tokenizer, save_checkpoint, tokenizer_meta, file_digest
    from kit.faults import UsageError
    from maskgit import MaskGIT, MaskGITConfig
    from text_encoder import CaptionTokenizer, TextEncoderConfig
    from vqgan import VQGAN, VQGANConfig
    torch.manual_seed(0)
    tok_cfg = VQGANConfig(widths=(8, 16, 16), codebook_size=32, code_dim=4)
    tok_path, gen_path = os.path.join(folder, "tok.safetensors"), os.path.join(folder, "gen.safetensors")
    # a 16-pixel, 5-frame pair: a 2 x 2 grid of codes, 3 latent frames
    record = {"data": "animals", "batch_size": 4, "frames": 5, "image_size": 16}
    save_checkpoint(tok_path, VQGAN(tok_cfg).state_dict(),
                    tokenizer_meta("vqgan", tok_cfg, 5) | {"train_config": json.dumps(record)})
    text = CaptionTokenizer.train(["a dog running", "a cat sitting"] * 4, vocab_size=300)
    gen_cfg = MaskGITConfig(codebook_size=32, latent_frames=3, grid=2, dim=32, depth=2, heads=2, mlp=64,
                            text=TextEncoderConfig(vocab_size=300, dim=32, depth=1, heads=2, mlp=64, max_len=16))
    save_checkpoint(gen_path, MaskGIT(gen_cfg).state_dict(), generator_meta(gen_cfg, 9, text, file_digest(tok_path))
                    | {"train_config": json.dumps(record)})
    loaders = {"1": lambda p: load_tokenizer(p), "2": lambda p: load_generator(p, tok_path)}
    for _ in range(3):  # the clean files, loaded as often as any mutation is: the memory to compare with
        loaders["1"](tok_path), loaders["2"](gen_path)
    gc.collect()
    clean = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts, failures = {"loaded": 0, "refused": 0}, []
    for stage, path in (("1", tok_path), ("2", gen_path)):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(path)
        cases = [(name, tensors, mutated) for name, mutated in mutations(meta, stage)]
        cases += [(name, mutated, meta) for name, mutated in tensor_mutations(tensors)]
        for name, mutated_tensors, mutated in cases:
            target = os.path.join(folder, f"mutant-{stage}.safetensors")
            save_file(mutated_tensors, target, metadata=mutated)
            try:
                loaders[stage](target)
                counts["loaded"] += 1
            except UsageError as err:
                if "\n" in str(err):
                    failures.append(f"{stage} {name}: a message of many lines")
                counts["refused"] += 1
            except Exception as err:  # anything else would be a traceback in the scripts
                failures.append(f"{stage} {name}: {type(err).__name__}: {str(err)[:100]}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return counts | {"mutations": counts["loaded"] + counts["refused"] + len(failures), "failures": failures,
                     "clean_kb": clean, "peak_kb": peak}


if __name__ == "__main__":
    print(json.dumps(fuzz(sys.argv[1])))
