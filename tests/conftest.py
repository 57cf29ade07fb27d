"""Shared test fixtures.

- `tiny_tokenizer_dir`: a temporary directory holding tests/tiny_tokenizer.py's tokenizer
  (KLUE layout, [PAD] = 1).  Tests that need the function itself import it from there.
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
