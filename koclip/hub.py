"""Finding checkpoint files: a local directory, or a hub repository through huggingface_hub's cache.

With no network, huggingface_hub retries for about 20 s before giving up; a
quick reachability probe first lets `load` fail in seconds with one clear
message, or use what is cached.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from koclip.errors import CheckpointError, OfflineError
from koclip.formats import INDEX_FILES, WEIGHT_FILES

PROBE_TIMEOUT = 3.0
# Everything a checkpoint directory may need, except the weights, which are chosen one format at a time.
SMALL_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model", "*.index.json"]


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_forced() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """True when a TCP connection to the hub endpoint opens within `timeout` seconds."""
    if offline_forced():
        return False
    u = urlparse(endpoint())
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        with socket.create_connection((u.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve(name: str, *, weights: bool = True, label: str | None = None,
            revision: str | None = None) -> Path:
    """Returns a local directory holding `name`'s config.json (and one weight file when `weights`).

    `name` is a local directory or a hub repo id.  Cached files are used when the
    hub cannot be reached; if nothing is cached, raises OfflineError naming the
    model and the offline alternative.
    """
    label = label or name
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    if not is_repo_id(name):
        raise CheckpointError(f"{name!r} is neither a local directory nor a hub repository id (owner/name)")
    # Deferred: koclip-mini and local directories never need huggingface_hub or the HTTP stack it imports.
    import huggingface_hub as hf
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    online = hub_reachable()
    try:
        local = Path(hf.snapshot_download(name, revision=revision, allow_patterns=SMALL_FILES,
                                          local_files_only=not online))
        if weights:
            _fetch_weights(hf, name, revision, local, online)
        return local
    except (LocalEntryNotFoundError, FileNotFoundError):
        if online:
            raise
        raise OfflineError(
            f"cannot load {label}: its files ({name}) are not in the local cache "
            f"({hf.constants.HF_HUB_CACHE}) and the hub ({endpoint()}) cannot be reached. "
            "Use 'koclip-mini', which works offline, or pass a local checkpoint directory.") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{name}: no such repository on {endpoint()}") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{name}: the hub refused the download: {e}") from None


def _fetch_weights(hf, name, revision, local: Path, online: bool) -> None:
    if any((local / f).is_file() for f in (*WEIGHT_FILES, *INDEX_FILES)):
        return
    if online:
        files = set(hf.list_repo_files(name, revision=revision))
    else:
        files = set(WEIGHT_FILES)
    for f in WEIGHT_FILES:
        if f not in files:
            continue
        try:
            hf.hf_hub_download(name, f, revision=revision, local_files_only=not online)
            return
        except Exception:  # noqa: BLE001 - try the next format, report below
            if online:
                raise
    for index_name, stem in INDEX_FILES.items():
        if (local / index_name).is_file():
            hf.snapshot_download(name, revision=revision, allow_patterns=[stem.split(".")[0] + "*"],
                                 local_files_only=not online)
            return
    raise FileNotFoundError(f"{name}: no weight file ({', '.join(WEIGHT_FILES)})")
