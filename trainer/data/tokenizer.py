"""The shared source/target subword tokenizer: byte-level BPE from HF ``tokenizers``.

Byte-level BPE needs no ``<unk>`` (every byte is in the vocabulary) and decodes to exactly
the text it encoded, so ``decode`` gives detokenised text that sacrebleu can score.
The trained tokenizer is cached as ``tokenizer-<hash>.json``, the hash covering the training
text, the settings and the ``tokenizers`` version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer.data.cache import load_or_build

PAD, SEP, EOS = "<pad>", "<sep>", "<eos>"
SPECIAL_TOKENS = (PAD, SEP, EOS)  # ids 0, 1, 2


def tokenizer_key(texts: Iterable[str], vocab_size: int) -> str:
    settings = {
        "model": "bpe-bytelevel",
        "vocab_size": vocab_size,
        "special_tokens": SPECIAL_TOKENS,
        "tokenizers": tokenizers.__version__,
    }
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in texts:
        h.update(text.encode())
        h.update(b"\n")
    return h.hexdigest()


def load_or_train(
    texts: list[str], vocab_size: int, cache_dir: Path
) -> tuple[Tokenizer, str, bool]:
    """The tokenizer trained on ``texts``, from the cache or trained now.

    Returns ``(tokenizer, key, trained)``; ``trained`` is False on a cache hit.
    """
    key = tokenizer_key(texts, vocab_size)

    def build(f: IO[bytes]) -> None:
        f.write(train(texts, vocab_size).to_str().encode())

    tokenizer, trained = load_or_build(
        cache_dir / f"tokenizer-{key[:32]}.json", lambda p: Tokenizer.from_file(str(p)), build
    )
    # '<eos>' written in a corpus is text, never the control token (which would end the
    # target there and make the reference unreachable)
    tokenizer.encode_special_tokens = True
    return tokenizer, key, trained


def train(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == i, "special tokens must come first"
    return tokenizer
