"""The tiny WordPiece tokenizer the tests and scripts/make_parity_fixtures.py share.

`write_tiny_tokenizer(directory, layout)` writes a ~90-token `tokenizer.json` +
`tokenizer_config.json` with the `tokenizers` library; `tiny_vocab(layout)` lists its tokens.
A plain module (no pytest), so the fixture script can import it too.
"""

from __future__ import annotations

import json
from pathlib import Path

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
