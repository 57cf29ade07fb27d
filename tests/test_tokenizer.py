"""koclip.tokenizer.FastTokenizer against transformers' PreTrainedTokenizerFast on the same files."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from tiny_tokenizer import write_tiny_tokenizer
from koclip.errors import CheckpointError
from koclip.tokenizer import load_tokenizer
from koclip.tokenizer import SPECIAL_TOKENS, FastTokenizer

TEXTS = [
    "query: 이것은 고양이 이다",
    "a photo of a dog.",
    "",
    "  여러   칸의   공백과 Ünïcödé, 😀 이모지 ",
    "아주 긴 문장 " * 80,                       # longer than any max_length below
    "ＦＵＬＬＷＩＤＴＨ ｶﾀｶﾅ ① ㈜",               # NFKC / precompiled-charsmap territory
]


def same_encodings(fast, hf, **kw):
    a, b = fast(TEXTS, **kw), hf(TEXTS, **kw)
    assert a["input_ids"] == b["input_ids"]
    assert a["attention_mask"] == b["attention_mask"]


@pytest.fixture(scope="module")
def e5_dir(tmp_path_factory):
    """The e5 tokenizer as koclip-mini's cache holds it: saved by transformers."""
    from koclip.mini.e5 import e5_tokenizer

    directory = tmp_path_factory.mktemp("e5")
    e5_tokenizer().save_pretrained(str(directory))
    return directory


@pytest.mark.parametrize("kw", [{}, {"truncation": True, "max_length": 8}, {"truncation": True, "max_length": 96},
                                {"truncation": True}])
def test_e5_encodings_match_transformers(e5_dir, kw):
    same_encodings(FastTokenizer.from_directory(e5_dir), PreTrainedTokenizerFast.from_pretrained(str(e5_dir)), **kw)


@pytest.mark.parametrize("kw", [{}, {"truncation": True, "max_length": 5}, {"truncation": True}])
def test_wordpiece_encodings_match_transformers(tmp_path, kw):
    directory = write_tiny_tokenizer(tmp_path / "tok", model_max_length=12)
    same_encodings(FastTokenizer.from_directory(directory),
                   PreTrainedTokenizerFast.from_pretrained(str(directory)), **kw)


def test_special_tokens_and_ids_match_transformers(e5_dir):
    fast, hf = FastTokenizer.from_directory(e5_dir), PreTrainedTokenizerFast.from_pretrained(str(e5_dir))
    for key in SPECIAL_TOKENS:
        assert getattr(fast, key) == getattr(hf, key), key
        assert getattr(fast, key + "_id") == getattr(hf, key + "_id"), key
    assert fast.pad_token_id == 1 and fast.model_max_length == hf.model_max_length == 512


def test_a_single_string_gives_one_list(tmp_path):
    fast = FastTokenizer.from_directory(write_tiny_tokenizer(tmp_path / "tok"))
    out = fast("고양이", truncation=True)
    assert out["input_ids"] == fast(["고양이"])["input_ids"][0] and out["attention_mask"] == [1, 1, 1]


def test_saved_files_load_in_transformers_and_encode_alike(e5_dir, tmp_path):
    fast = FastTokenizer.from_directory(e5_dir)
    fast(["x"], truncation=True, max_length=4)  # a truncation setting must not leak into the saved file
    fast.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "tokenizer.json").read_text())["truncation"] is None
    same_encodings(FastTokenizer.from_directory(tmp_path / "saved"),
                   PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "saved")), truncation=True, max_length=20)


def test_load_tokenizer_reads_a_folder_without_transformers(tmp_path):
    tok = load_tokenizer("unused", write_tiny_tokenizer(tmp_path / "tok"))
    assert isinstance(tok, FastTokenizer) and tok.pad_token == "[PAD]"


def test_a_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
    directory = write_tiny_tokenizer(tmp_path / "tok")
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordPi')
    with pytest.raises(CheckpointError, match=r"tok: cannot read the tokenizer"):
        FastTokenizer.from_directory(directory)


def test_padding_is_refused_with_the_reason(tmp_path):
    fast = FastTokenizer.from_directory(write_tiny_tokenizer(tmp_path / "tok"))
    with pytest.raises(ValueError, match="does not pad"):
        fast(["고양이"], padding=True)


def test_special_tokens_come_from_special_tokens_map_when_the_config_lacks_them(tmp_path):
    directory = write_tiny_tokenizer(tmp_path / "tok")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["pad_token"]
    config["sep_token"] = {"content": "[SEP]", "lstrip": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]", "sep_token": "[CLS]"}))
    fast = FastTokenizer.from_directory(directory)
    assert fast.pad_token == "[PAD]" and fast.pad_token_id == 1  # the klue layout: [CLS] [PAD] [SEP] ...
    assert fast.sep_token == "[SEP]"  # tokenizer_config.json wins where both name a token
