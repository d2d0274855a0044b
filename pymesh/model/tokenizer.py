"""The tokenizer of a Hugging Face model folder, without transformers.

``load_tokenizer(model_dir)`` reads ``tokenizer.json`` with the ``tokenizers`` package and
``tokenizer_config.json`` (special tokens, ``add_bos_token``, the chat template, or
``chat_template.jinja``). End-of-sequence ids are gathered from config.json,
generation_config.json and the tokenizer's own eos token.

Streaming: :meth:`Tokenizer.stream_decoder` returns a decoder whose ``push(token_id)``
returns only complete text. For byte-level BPE vocabularies (GPT-2 style) it maps every
token to its bytes and decodes UTF-8 incrementally, so a character split over several
tokens comes out whole once its last byte arrives. Other vocabularies decode a sliding
window of ids and hold text back while it ends in a replacement character.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from pymesh.errors import ConfigError
from pymesh.model.chat import render_chat
from pymesh.model.gguf_file import is_gguf

log = logging.getLogger(__name__)

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


_CHAR_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(content := value.get("content"), str):
        return content
    return None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


class ByteLevelStreamDecoder:
    """Incremental detokenizer for byte-level BPE: emits text only at UTF-8 boundaries."""

    def __init__(self, pieces: list[bytes], skip: frozenset[int]) -> None:
        self._pieces = pieces
        self._skip = skip
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id in self._skip or not 0 <= token_id < len(self._pieces):
            return ""
        return str(self._utf8.decode(self._pieces[token_id], final=False))

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD); resets the decoder."""
        out = str(self._utf8.decode(b"", final=True))
        self._utf8.reset()
        return out


class WindowStreamDecoder:
    """Incremental detokenizer for any vocabulary: decodes a sliding window of ids.

    Text is held back while the window's decoding ends in U+FFFD (an incomplete character).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=self._skip))

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        self._ids.clear()
        self._prefix = self._read = 0
        return now[len(before):]


StreamDecoder = ByteLevelStreamDecoder | WindowStreamDecoder


class Tokenizer:
    """Encode, decode, chat templates and streaming detokenisation for one model folder."""

    def __init__(
        self,
        backend: Any,
        *,
        config: dict[str, Any] | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        source: str = "<memory>",
    ) -> None:
        self._tok = backend
        self.config = dict(config or {})
        self.source = source
        self.chat_template = chat_template
        self.special_tokens: dict[str, str | None] = {k: _token_text(self.config.get(k)) for k in _SPECIAL_KEYS}
        self.bos_token_id = self._id_of(self.special_tokens["bos_token"])
        self.pad_token_id = self._id_of(self.special_tokens["pad_token"])
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.add_eos_token = bool(self.config.get("add_eos_token", False))
        eos: list[int] = []
        for i in [*eos_token_ids, self._id_of(self.special_tokens["eos_token"])]:
            if i is not None and i not in eos:
                eos.append(i)
        self.eos_token_ids: list[int] = eos
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self._pieces = self._byte_pieces(added)

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    def _byte_pieces(self, added: dict[int, Any]) -> list[bytes] | None:
        """Each id's bytes when the vocabulary is byte-level BPE, else None."""
        if type(self._tok.decoder).__name__ != "ByteLevel":
            return None
        pieces: list[bytes] = []
        for i in range(self.vocab_size):
            text = self._tok.id_to_token(i)
            if text is None:
                pieces.append(b"")
            elif i in added:
                pieces.append(text.encode("utf-8"))
            else:
                pieces.append(b"".join(bytes([_CHAR_TO_BYTE[c]]) if c in _CHAR_TO_BYTE else c.encode("utf-8") for c in text))
        return pieces

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Pass ``add_special_tokens=False`` for chat-templated text,
        which already carries its special tokens."""
        ids = [int(i) for i in self._tok.encode(text, add_special_tokens=add_special_tokens).ids]
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
                ids.insert(0, self.bos_token_id)
            if self.add_eos_token and self.eos_token_ids and (not ids or ids[-1] != self.eos_token_ids[0]):
                ids.append(self.eos_token_ids[0])
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        if not self.chat_template:
            raise ConfigError(
                f"{self.source} has no chat template (neither tokenizer_config.json's chat_template nor "
                "chat_template.jinja); run without --chat, or add a template to the folder"
            )
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens, **extra)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat-templated conversation (as transformers' tokenize=True)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        if self._pieces is not None:
            skip = self.special_ids if skip_special_tokens else frozenset()
            return ByteLevelStreamDecoder(self._pieces, skip)
        return WindowStreamDecoder(self._tok, skip_special_tokens)


def _chat_template(folder: Path, cfg: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tpl = cfg.get("chat_template")
    if isinstance(tpl, str):
        return tpl
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        choice = named.get("default")
        return choice if isinstance(choice, str) else None
    return None


def _ordered_ids(*values: Any) -> list[int]:
    """The ids of every ``eos_token_id``-style value, in order, each once."""
    out: list[int] = []
    for value in values:
        for i in _ids(value):
            if i not in out:
                out.append(i)
    return out


def _load_gguf_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes: what the converter would write to
    tokenizer.json / tokenizer_config.json / generation_config.json, built in memory."""
    from pymesh.model.gguf_convert import GGUFModel, generation_config
    from pymesh.model.gguf_tokenizer import build_tokenizer, tokenizer_config

    model = GGUFModel.open(path)
    cfg = model.config("float32")
    vocab = model.vocab()
    tok_cfg = tokenizer_config(vocab, cfg["max_position_embeddings"])
    eos = _ordered_ids(generation_config(vocab).get("eos_token_id"), cfg.get("eos_token_id"))
    return Tokenizer(build_tokenizer(vocab), config=tok_cfg, eos_token_ids=eos,
                     chat_template=vocab.chat_template or None, source=str(model.path))


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a Hugging Face folder (needs ``tokenizer.json``) or of a GGUF file."""
    from tokenizers import Tokenizer as Backend

    if is_gguf(model_dir):
        return _load_gguf_tokenizer(model_dir)
    folder = Path(model_dir)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"{folder} has no tokenizer.json; pymesh reads only the fast-tokenizer file. Create it with "
            "transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
        )
    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad files
        raise ConfigError(f"{path} could not be loaded by the tokenizers package: {exc}") from exc
    cfg = _read_json(folder / "tokenizer_config.json")
    eos = _ordered_ids(*(_read_json(folder / name).get("eos_token_id")
                         for name in ("generation_config.json", "config.json")))
    return Tokenizer(backend, config=cfg, eos_token_ids=eos, chat_template=_chat_template(folder, cfg), source=str(folder))
