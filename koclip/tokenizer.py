"""A tokenizer read from `tokenizer.json` with the `tokenizers` library alone.

transformers' `PreTrainedTokenizerFast` encodes with the same Rust tokenizer,
but importing transformers took 0.66 s of koclip-mini's ~3.6 s warm start (from
`load()` to the first text embedding) here.  `FastTokenizer` offers the part of
its interface that koclip uses:

    tok = FastTokenizer.from_directory("model/")     # tokenizer.json (+ tokenizer_config.json)
    tok(["이것은 고양이 이다"], truncation=True, max_length=96)
        -> {"input_ids": [[0, ...]], "attention_mask": [[1, ...]]}, lists, unpadded
    tok.pad_token_id, tok.eos_token, tok.model_max_length, ...
    tok.save_pretrained("out/")                      # files that transformers' AutoTokenizer reads

`load_tokenizer(name, directory)` picks it when `directory` holds a tokenizer.json,
and falls back on transformers' AutoTokenizer for other layouts.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from koclip import hub
from koclip.errors import CheckpointError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_id(key: str):
    def get(self) -> int | None:
        token = getattr(self, key)
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    return property(get, doc=f"The id of `{key}`, or None when the tokenizer has none.")


class FastTokenizer:
    """`backend`: a `tokenizers.Tokenizer`; special tokens by name, as in tokenizer_config.json."""

    def __init__(self, backend, *, model_max_length: int | None = None, **special_tokens: str | None):
        unknown = set(special_tokens) - set(SPECIAL_TOKENS)
        if unknown:
            raise TypeError(f"unknown special tokens {sorted(unknown)}; valid: {SPECIAL_TOKENS}")
        self.backend_tokenizer = backend
        self.model_max_length = model_max_length
        for key in SPECIAL_TOKENS:
            setattr(self, key, special_tokens.get(key))
        # Truncation is a setting of the shared Rust tokenizer: one call at a time sets and uses it
        # (the app serves several sessions from threads).
        self._lock = threading.Lock()

    bos_token_id = _token_id("bos_token")
    eos_token_id = _token_id("eos_token")
    unk_token_id = _token_id("unk_token")
    sep_token_id = _token_id("sep_token")
    pad_token_id = _token_id("pad_token")
    cls_token_id = _token_id("cls_token")
    mask_token_id = _token_id("mask_token")

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> FastTokenizer:
        """Reads `tokenizer.json`, and the special tokens and maximum length from
        `tokenizer_config.json` when it is there."""
        directory = Path(directory)
        try:
            backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
            config = read_config(directory)
        except Exception as e:  # noqa: BLE001 - the Rust parser raises a bare Exception
            raise CheckpointError(f"{directory}: cannot read the tokenizer: {e}") from None
        return cls(backend, **config)

    def __call__(self, texts: str | Sequence[str], *, truncation: bool = False, max_length: int | None = None,
                 padding: bool = False, add_special_tokens: bool = True) -> dict:
        """Token ids and attention masks of `texts` (one list per text; a str gives one list).

        truncation=True cuts each text to `max_length` tokens (default
        `model_max_length`) with its special tokens, as transformers does.
        """
        if padding:
            raise ValueError("FastTokenizer does not pad: koclip.Processor pads to its length buckets")
        single = isinstance(texts, str)
        limit = (max_length or self.model_max_length) if truncation else None
        with self._lock:
            if limit:
                self.backend_tokenizer.enable_truncation(limit)
            else:
                self.backend_tokenizer.no_truncation()
            self.backend_tokenizer.no_padding()
            encodings = self.backend_tokenizer.encode_batch([texts] if single else list(texts),
                                                            add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encodings]
        mask = [e.attention_mask for e in encodings]
        return {"input_ids": ids[0], "attention_mask": mask[0]} if single else {"input_ids": ids,
                                                                                 "attention_mask": mask}

    def save_pretrained(self, directory: str | os.PathLike) -> tuple[str, str]:
        """Writes tokenizer.json and tokenizer_config.json into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.backend_tokenizer.no_truncation()
            self.backend_tokenizer.no_padding()
            self.backend_tokenizer.save(str(directory / "tokenizer.json"))
        config = {key: getattr(self, key) for key in SPECIAL_TOKENS if getattr(self, key) is not None}
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                        encoding="utf-8")
        return str(directory / "tokenizer.json"), str(directory / "tokenizer_config.json")


def read_config(directory: Path) -> dict:
    """The special tokens and model_max_length in `directory`'s tokenizer_config.json, with
    special_tokens_map.json (older checkpoints) for tokens the first does not name.

    transformers writes a token either as a string or as {"content": ...}.
    """
    config, tokens = {}, {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        path = directory / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if name == "tokenizer_config.json":
                config = data
            for key in SPECIAL_TOKENS:
                value = data.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    tokens[key] = value
    out = dict(tokens)
    # transformers writes a huge integer for "no limit".
    if isinstance(config.get("model_max_length"), int) and config["model_max_length"] < 10**9:
        out["model_max_length"] = config["model_max_length"]
    return out


def load_tokenizer(name: str, directory: Path | None = None):
    """A tokenizer: from `directory` when it holds a tokenizer.json (a FastTokenizer, without
    importing transformers) or a spiece.model (SigLIP's), else `name` (a hub id resolved through
    koclip.hub, or a local path) through transformers' AutoTokenizer.

    A SigLIP sentencepiece tokenizer (a spiece.model whose tokenizer_config.json names SiglipTokenizer,
    or names no class) is read with transformers' SiglipTokenizer itself, which needs the sentencepiece
    and protobuf packages: AutoTokenizer would also build the model's config, and warn about it."""
    if directory is not None and (Path(directory) / "tokenizer.json").is_file():
        return FastTokenizer.from_directory(directory)
    if directory is not None and (Path(directory) / "spiece.model").is_file():
        local = Path(directory)
    elif not name:
        raise CheckpointError(f"{directory}: holds no tokenizer (tokenizer.json or spiece.model), and the "
                              "model's config names none")
    else:
        local = hub.resolve(name, weights=False, label=f"tokenizer {name}")
    # transformers' auto classes import torch when it is installed (seconds): import only what is used.
    try:
        if (local / "spiece.model").is_file() and _tokenizer_class(local) in (None, "SiglipTokenizer"):
            from transformers import SiglipTokenizer

            return SiglipTokenizer.from_pretrained(str(local))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(local))
    except (OSError, ValueError, ImportError) as e:
        raise CheckpointError(f"{local}: cannot load tokenizer: {e}") from None


def _tokenizer_class(directory: Path) -> str | None:
    """The tokenizer_class that `directory`'s tokenizer_config.json names, if any."""
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        value = config.get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
