"""Shared test fixtures.

- `write_tiny_tokenizer(directory, layout)`: a plain function (no pytest needed, so
  scripts/make_parity_fixtures.py uses it too) that writes a ~90-token WordPiece
  `tokenizer.json` + `tokenizer_config.json` with the `tokenizers` library.
- `tiny_tokenizer_dir`: a temporary directory holding that tokenizer (KLUE layout, [PAD] = 1).
- `parity_fixture(name)`: path of a committed checkpoint under tests/fixtures/parity (read-only use).
- `parity_copy(name)`: a writable copy of one, in tmp_path, for tests that damage files.
- `hf_cache`: an empty huggingface_hub cache in tmp_path, with `hf_cache.put(repo_id, src_dir)`
  to lay a checkpoint out as a downloaded snapshot.  It does not switch the hub off: tests set
  HF_HUB_OFFLINE or HF_ENDPOINT themselves.
- `http_server`: tmp_path served over HTTP on 127.0.0.1 (a loopback address, so koclip.fetch
  refuses it unless KOCLIP_ALLOW_PRIVATE_URLS=1); the base URL.
"""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY = FIXTURES / "parity"

# Words and syllables the tiny tokenizer knows: enough to cover the captions in
# scripts/make_parity_fixtures.py with whole words, word pieces and an [UNK].
_WORDS = ["이것은", "고양이", "강아지", "사진", "이다", "자동차", "도로", "바다", "위의", "배", "빨간",
          "ABC", "cat"]
_SYLLABLES = "고양이강아지사진다자동차도로바위의배빨간를달린가은것는에서한마리"
_ASCII = "abct"
_PUNCT = [".", ",", "!", "?", "1"]
# Special-token orders: KLUE's RoBERTa vocab starts [CLS] [PAD] [SEP] [UNK] [MASK] (pad id 1, as
# RoBERTa's padding_idx); BERT's starts [PAD] [UNK] [CLS] [SEP] [MASK] (pad id 0).
_SPECIALS = {
    "klue": ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"],
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
}


def tiny_vocab(layout: str = "klue") -> list[str]:
    """The tokens of the tiny tokenizer in id order (fewer than 99, the tiny configs' vocab_size)."""
    tokens = list(_SPECIALS[layout]) + _PUNCT + _WORDS
    for ch in _SYLLABLES + _ASCII:
        for t in (ch, "##" + ch):
            if t not in tokens:
                tokens.append(t)
    return tokens


def write_tiny_tokenizer(directory, layout: str = "klue", model_max_length: int = 32) -> Path:
    """Writes tokenizer.json (NFKC, BERT pre-tokenizer, WordPiece, [CLS] x [SEP]) and
    tokenizer_config.json into `directory`; returns the directory.

    No accent stripping: NFD/strip-accents would split Hangul syllables into jamo.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if layout not in _SPECIALS:
        raise ValueError(f"unknown tokenizer layout {layout!r}; valid: {', '.join(_SPECIALS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(tiny_vocab(layout))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
              "mask_token": "[MASK]"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


@pytest.fixture
def tiny_tokenizer_dir(tmp_path) -> Path:
    return write_tiny_tokenizer(tmp_path / "tokenizer")


@pytest.fixture
def parity_fixture():
    """`parity_fixture("hybrid_clip_clip")` -> the committed directory (do not modify it)."""

    def get(name: str) -> Path:
        path = PARITY / name
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such parity fixture; run scripts/make_parity_fixtures.py")
        return path

    return get


@pytest.fixture
def parity_copy(tmp_path, parity_fixture):
    """`parity_copy("dual_clip_safetensors")` -> a writable copy in tmp_path."""

    def copy(name: str) -> Path:
        dst = tmp_path / "copies" / name
        shutil.copytree(parity_fixture(name), dst)
        return dst

    return copy


class HubCache:
    """A huggingface_hub cache directory in the layout `snapshot_download` leaves behind."""

    def __init__(self, root: Path):
        self.root = root

    def put(self, repo_id: str, src: Path, sha: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
        """Copies the files of `src` in as the `main` snapshot of model `repo_id`; returns the snapshot dir."""
        repo = self.root / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / sha
        shutil.copytree(src, snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> HubCache:
    """An empty hub cache that huggingface_hub uses for this test.

    huggingface_hub reads HF_HUB_CACHE into `constants` at import, so the constant is patched
    as well as the environment.
    """
    import huggingface_hub.constants as hf_constants

    root = tmp_path / "hf_cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root))
    return HubCache(root)


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path on 127.0.0.1:<free port>; yields the base URL."""
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
