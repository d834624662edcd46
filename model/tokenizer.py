"""Byte-level BPE tokenizer: train one on a corpus, or load the tokenizer.json of a checkpoint directory.

Byte-level means every string encodes and decodes losslessly (any script, any bytes), so token counts in dataset
manifests and the proxy's training data never lose text to <unk>.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from core.io import atomic_write_text

TOKENIZER_NAME = "tokenizer.json"
# Ids 0-2 follow MiniCPM (<unk>, <s>, </s>); the chat markers serve the SFT format.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "</s>"


def _iter_texts(texts_or_files: Iterable[str | os.PathLike]) -> Iterator[str]:
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            with open(item, encoding="utf-8") as f:
                yield from f
        else:
            yield item


def train_bpe_tokenizer(
    texts_or_files: Iterable[str | os.PathLike],
    vocab_size: int,
    out_path: str | Path,
    *,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train on texts (``str`` items) and/or files (``Path`` items, read line by line); save to out_path.

    out_path may be a directory (tokenizer.json is written inside it) or a file path.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is below the 256 byte tokens plus {len(SPECIAL_TOKENS)} specials"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_iter_texts(texts_or_files), trainer=trainer)
    out_path = Path(out_path)
    if out_path.is_dir() or out_path.suffix != ".json":
        out_path = out_path / TOKENIZER_NAME
    atomic_write_text(out_path, tokenizer.to_str(pretty=True))
    return tokenizer


def load_tokenizer(path_or_dir: str | Path) -> Tokenizer:
    """A tokenizer.json file, or a (checkpoint) directory holding one."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / TOKENIZER_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path}: expected a {TOKENIZER_NAME} file or a directory holding one"
        )
    return Tokenizer.from_file(str(path))


def eos_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN} token to separate documents")
    return token_id
