"""
The caption encoder that conditions Phenaki's generator (Phenaki §2.2), small and trained from scratch.

The paper conditions MaskGIT on a frozen, pre-trained T5-XXL. This project downloads nothing, so it
learns its own text model jointly with the generator, in two pieces:

- `CaptionTokenizer`: a byte-level BPE (Sennrich et al. 2016, as in GPT-2) built with the
  `tokenizers` library and trained on the training captions. Its base alphabet is the 256 byte
  values, so every string has an encoding: a word never seen in training falls apart into byte-level
  pieces instead of becoming [UNK]. It also remembers the words it was trained on, so that sample.py
  can warn about a prompt the model knows nothing of. It is saved as JSON in the generator
  checkpoint's metadata.
- `TextEncoder`: token and position embeddings and a bidirectional transformer (transformer.py).
  ids (B, L) + mask (B, L) -> states (B, L, D).

Every caption starts with a [BOS] token. The empty caption is therefore one real token, and it is
the "no text" input that classifier-free guidance needs: dropping a caption in training and asking
for the unconditional prediction in sampling both mean "encode the empty string". It also means no
row of the cross-attention mask is ever all False.

Deviations from the paper: a 2-4 layer encoder trained with the generator instead of a frozen T5-XXL
(4.6B parameters); captions are lower-cased; at most `max_len` tokens are kept.
"""

import json
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from transformer import Transformer

# Legend: B batch, L text length, D width.

# ids of the two special tokens, fixed by the order they are given to the trainer
PAD = 0
BOS = 1
# the fewest tokens a caption BPE has: its 256 byte values and the two specials
MIN_VOCAB = 256 + 2


def words_of(text: str) -> list[str]:
    """The words of a caption, as the unseen-word warning counts them."""
    return re.findall(r"[a-z0-9']+", text.lower())


class CaptionTokenizer:
    """Byte-level BPE over lower-cased captions, plus the set of words seen in training."""

    def __init__(self, bpe: Tokenizer, words: list[str]):
        self.bpe = bpe
        self.words = set(words)
        # "[PAD]" typed in a caption is text, never the special token
        self.bpe.encode_special_tokens = True

    @classmethod
    def train(cls, captions: list[str], vocab_size: int) -> "CaptionTokenizer":
        bpe = Tokenizer(models.BPE())
        bpe.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[BOS]"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        bpe.train_from_iterator(captions, trainer)
        words = set()
        for c in captions:
            words.update(words_of(c))
        return cls(bpe, sorted(words))

    def to_json(self) -> str:
        return json.dumps({"bpe": self.bpe.to_str(), "words": sorted(self.words)})

    @classmethod
    def from_json(cls, text: str) -> "CaptionTokenizer":
        fields = json.loads(text)
        return cls(Tokenizer.from_str(fields["bpe"]), fields["words"])

    @property
    def vocab_size(self) -> int:
        return self.bpe.get_vocab_size()

    def encode(self, captions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """captions -> ids (B, L) long and mask (B, L) bool, True = real token; [BOS] first, then at
        most max_len - 1 caption tokens, padded to the longest caption in the batch."""
        rows = [[BOS] + self.bpe.encode(c).ids[: max_len - 1] for c in captions]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        lengths = torch.tensor([len(r) for r in rows])
        return ids, torch.arange(L)[None] < lengths[:, None]

    def decode(self, ids: torch.Tensor) -> str:
        """One row of ids back to text (special tokens dropped)."""
        return self.bpe.decode([i for i in ids.tolist() if i not in (PAD, BOS)]).strip()

    def unseen(self, text: str) -> list[str]:
        """The words of `text` that no training caption contained."""
        return [w for w in words_of(text) if w not in self.words]


@dataclass
class TextEncoderConfig:
    # BPE vocabulary, special tokens included; the tokenizer may use fewer
    vocab_size: int = 512
    # D, width of the text states
    dim: int = 128
    # transformer blocks
    depth: int = 2
    # attention heads
    heads: int = 4
    # hidden width of the feed-forward
    mlp: int = 512
    # tokens kept per caption, [BOS] included
    max_len: int = 32


class TextEncoder(nn.Module):
    """ids (B, L), mask (B, L) -> text states (B, L, D). Padding is never attended to."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.pos_emb = nn.Parameter(torch.randn(config.max_len, config.dim) * 0.02)
        self.transformer = Transformer(config.dim, config.depth, config.heads, config.mlp)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb[:L]  # (B, L, D)
        return self.transformer(x, mask=mask)  # (B, L, D)
