"""Byte-level BPE tokenizer: training, special tokens, lossless round trips, save/load."""

from pathlib import Path

import pytest

from model.tokenizer import SPECIAL_TOKENS, eos_id, load_tokenizer, train_bpe_tokenizer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SHAKESPEARE = DATA / "text" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    return train_bpe_tokenizer([SHAKESPEARE], 1000, out), out


def test_vocab_size_and_special_token_ids(trained):
    tokenizer, _ = trained
    assert tokenizer.get_vocab_size() == 1000
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert eos_id(tokenizer) == 2
    # Chat markers stay single tokens inside text.
    assert tokenizer.encode("<|im_start|>user").ids[0] == tokenizer.token_to_id("<|im_start|>")


@pytest.mark.parametrize(
    "text",
    [
        "ROMEO:\nBut soft, what light through yonder window breaks?",
        "满纸荒唐言，一把辛酸泪。",
        "tabs\tand  spaces \r\n emoji 🎭 zero\u200bwidth",
    ],
)
def test_decode_of_encode_is_lossless(trained, text):
    tokenizer, _ = trained
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_merges_learned_from_the_corpus_compress_it(trained):
    tokenizer, _ = trained
    text = SHAKESPEARE.read_text()[:20000]
    assert len(tokenizer.encode(text).ids) < len(text.encode()) / 2
    assert len(tokenizer.encode(" the").ids) == 1


def test_saved_tokenizer_loads_from_file_or_directory_and_training_is_deterministic(trained, tmp_path):
    tokenizer, out = trained
    sample = SHAKESPEARE.read_text()[:3000]
    for loaded in (load_tokenizer(out), load_tokenizer(out / "tokenizer.json")):
        assert loaded.encode(sample).ids == tokenizer.encode(sample).ids
    again = train_bpe_tokenizer([SHAKESPEARE], 1000, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == (out / "tokenizer.json").read_text()
    assert again.encode(sample).ids == tokenizer.encode(sample).ids


def test_texts_train_like_files_and_missing_tokenizer_is_named(tmp_path):
    texts = ["aaa bbb aaa bbb ccc"] * 50
    tokenizer = train_bpe_tokenizer(texts, 270, tmp_path)
    assert tokenizer.token_to_id("aaa") is not None
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
