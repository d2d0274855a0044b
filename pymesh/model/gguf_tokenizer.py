"""Rebuild a Hugging Face ``tokenizer.json`` from the vocabulary a GGUF file carries.

llama.cpp's converter stores a byte-level BPE ("gpt2" tokenizer model) as three arrays:
``tokenizer.ggml.tokens`` (already spelled in GPT-2's byte alphabet, ``Ġ`` for a space),
``tokenizer.ggml.merges`` ("a b" strings, best first) and ``tokenizer.ggml.token_type``
(1 normal, 3 control, 4 user-defined, ...). The split rule the vocabulary was trained with
is only named (``tokenizer.ggml.pre``); :data:`PRE_TOKENIZERS` maps the names pymesh knows
to the equivalent ``tokenizers`` pre-tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pymesh.errors import ConfigError

log = logging.getLogger(__name__)

TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

# Llama 3's split rule (tiktoken cl100k style): numbers in groups of up to three.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2's: the same, but every digit alone.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}

#: tokenizer.ggml.pre -> how text is split before BPE.
#: "digits": every digit alone, then GPT-2's byte-level regex (SmolLM, StarCoder).
#: "gpt2": GPT-2's byte-level regex alone. "llama3" / "qwen2": that model's regex, then bytes.
PRE_TOKENIZERS: dict[str, str] = {
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    "gpt2": "gpt2",
    "default": "gpt2",
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "smaug-bpe": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
}


@dataclass
class GGUFVocab:
    """What a GGUF file says about its tokenizer."""

    model: str                      # tokenizer.ggml.model
    pre: str                        # tokenizer.ggml.pre ("default" when absent)
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float]
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    eot_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    add_space_prefix: bool = True

    def token(self, index: int | None) -> str | None:
        if index is None or not 0 <= index < len(self.tokens):
            return None
        return self.tokens[index]


def _pre_tokenizer(kind: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if kind == "digits":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    if kind in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[kind]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two
    tokens, ranked by the merged token's score (best first)."""
    index = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, str, str]] = []
    for token, score in zip(tokens, scores):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in index and right in index:
                found.append((-score, index[left], index[right], left, right))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def _build_sentencepiece(vocab: GGUFVocab) -> Any:
    """Llama 2 / Mistral style vocabulary: BPE over "▁"-spelled pieces with byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if len(vocab.scores) != len(vocab.tokens):
        raise ConfigError("tokenizer.ggml.scores is missing or does not match tokenizer.ggml.tokens")
    table = {tok: i for i, tok in enumerate(vocab.tokens)}
    unk = vocab.token(vocab.unk_token_id)
    tok = Tokenizer(models.BPE(table, _spm_merges(vocab.tokens, vocab.scores), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if vocab.add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _build_byte_level(vocab: GGUFVocab) -> Any:
    from tokenizers import Tokenizer, decoders, models, processors

    if vocab.pre not in PRE_TOKENIZERS:
        log.warning(
            "tokenizer.ggml.pre %r is not one pymesh knows; splitting text with GPT-2's byte-level "
            "rule, which may tokenize some text differently from llama.cpp", vocab.pre,
        )
    kind = PRE_TOKENIZERS.get(vocab.pre, "gpt2")
    table = {tok: i for i, tok in enumerate(vocab.tokens)}
    if len(table) != len(vocab.tokens):
        log.warning("the GGUF vocabulary repeats %d token strings; the last id wins", len(vocab.tokens) - len(table))
    merges: list[tuple[str, str]] = []
    for i, line in enumerate(vocab.merges):
        parts = line.split(" ")
        if len(parts) != 2:
            raise ConfigError(f"tokenizer.ggml.merges[{i}] is {line!r}, expected two pieces separated by one space")
        merges.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(table, merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(kind)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_tokenizer(vocab: GGUFVocab) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to the file's vocabulary: byte-level BPE
    (``gpt2``) or SentencePiece-style BPE with byte fallback (``llama``)."""
    from tokenizers import AddedToken, processors

    if vocab.model == "gpt2":
        tok = _build_byte_level(vocab)
    elif vocab.model == "llama":
        tok = _build_sentencepiece(vocab)
    else:
        raise ConfigError(
            f"tokenizer.ggml.model is {vocab.model!r}; pymesh converts byte-level BPE ('gpt2') and "
            "SentencePiece BPE ('llama') vocabularies from GGUF. Use the model's Hugging Face folder instead."
        )
    bos = vocab.token(vocab.bos_token_id)
    if vocab.add_bos_token and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab.bos_token_id)]
        )
    types = vocab.token_types or [TOKEN_NORMAL] * len(vocab.tokens)
    specials = [
        AddedToken(t, special=True, normalized=False)
        for t, kind_ in zip(vocab.tokens, types)
        if kind_ in (TOKEN_CONTROL, TOKEN_UNKNOWN)
    ]
    unk = vocab.token(vocab.unk_token_id)
    if unk is not None and all(a.content != unk for a in specials):
        specials.append(AddedToken(unk, special=True, normalized=False))
    tok.add_special_tokens(specials)
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind_ in zip(vocab.tokens, types)
        if kind_ == TOKEN_USER_DEFINED
    ]
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(vocab.tokens):
        raise ConfigError(
            f"rebuilt tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens but the GGUF "
            f"lists {len(vocab.tokens)}; the file's vocabulary is inconsistent"
        )
    return tok


def tokenizer_config(vocab: GGUFVocab, max_length: int) -> dict[str, Any]:
    """The ``tokenizer_config.json`` that goes with :func:`build_tokenizer`'s output."""
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": vocab.add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
    }
    for key, index in (
        ("bos_token", vocab.bos_token_id),
        ("eos_token", vocab.eos_token_id),
        ("unk_token", vocab.unk_token_id),
        ("pad_token", vocab.pad_token_id),
    ):
        text = vocab.token(index)
        if text is not None:
            cfg[key] = text
    if vocab.chat_template:
        cfg["chat_template"] = vocab.chat_template
    return cfg
