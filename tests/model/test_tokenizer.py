"""pymesh's tokenizer wrapper against transformers' tokenizers, chat templates, streaming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pymesh.errors import ConfigError
from pymesh.model.chat import ChatTemplateError
from pymesh.model.tokenizer import ByteLevelStreamDecoder, Tokenizer, WindowStreamDecoder, load_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the test reference (pip install -e .[test])")

SAMPLES = [
    "Hello, world!",
    "The year 2024 had 366 days; π ≈ 3.14159 and 1,000,000 is a million.",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Emoji: 🎉👍🏽👨‍👩‍👧‍👦 🇫🇷 — café, naïve, Ærøskøbing, Ελληνικά, русский.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "   leading spaces, trailing   \t\ttabs\n\n\n\r\nmixed newlines    ",
    "{\"json\": [1, 2.5e-3, null, true], \"key\": \"va\\\"lue\"}",
    "<|im_start|>user\nspecial tokens inline<|im_end|> and <|endoftext|>",
    "URL https://example.com/a?b=c&d=e#frag, e-mail x.y@z.org, path C:\\Windows\\system32",
    "Zero-width\u200bjoiner and combining e\u0301 and a lone \ufffd replacement.",
    "",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi in 日本語 🙂"},
        {"role": "assistant", "content": "こんにちは"},
        {"role": "user", "content": "Now count: 1 2 3"},
    ],
]


@pytest.fixture(scope="module")
def ours(smollm2_dir: Path) -> Tokenizer:
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def ref(smollm2_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def test_encode_decode_match_transformers(ours: Tokenizer, ref) -> None:
    for text in SAMPLES:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert ours.decode(ours.encode(SAMPLES[3])) == SAMPLES[3]


def test_special_ids_and_eos(ours: Tokenizer, ref) -> None:
    assert ours.eos_token_ids == [ref.eos_token_id] == [2]
    assert ours.bos_token_id == ref.bos_token_id == 1
    assert ours.vocab_size == len(ref) == 49152
    assert ours.special_ids == frozenset(range(17))  # the 17 control tokens of the GGUF
    assert set(ref.all_special_ids) <= ours.special_ids


@pytest.mark.timeout(120)
def test_matches_transformers_tokenizer_built_from_the_gguf(ours: Tokenizer, smollm2_gguf: Path) -> None:
    gref = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in SAMPLES:
        assert ours.encode(text) == gref.encode(text), text
    assert ours.apply_chat_template(CHATS[1]) == gref.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)


def test_chat_template_matches_transformers(ours: Tokenizer, ref) -> None:
    for chat in CHATS:
        for gen in (True, False):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            want = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
            want = list(want["input_ids"] if not isinstance(want, list) else want)
            assert ours.encode_chat(chat, add_generation_prompt=gen) == want
    text = ours.apply_chat_template(CHATS[0])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def _with_template(src: Path, dst: Path, template: str | list, as_file: bool = False) -> Path:
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    if as_file:
        cfg.pop("chat_template", None)
        (dst / "chat_template.jinja").write_text(str(template))
    else:
        cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


TRICKY = """{%- set sys = namespace(found=false) -%}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% set sys.found = true %}{% endif %}
    {%- if m['role'] not in ['system', 'user', 'assistant'] -%}
        {{ raise_exception('bad role ' + m['role']) }}
    {%- endif %}
    <{{ m['role'] }}>{{ m['content'] | trim }}{{ eos_token }}
    {% if loop.last %}[{{ messages | length }} {{ {'k': m['content']} | tojson }}]{% endif %}
{% endfor %}
{%- if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}"""


def test_template_features_render_like_transformers(smollm2_dir: Path, tmp_path: Path) -> None:
    for i, as_file in enumerate((False, True)):
        folder = _with_template(smollm2_dir, tmp_path / f"t{i}", TRICKY, as_file=as_file)
        mine = load_tokenizer(folder)
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
        for chat in CHATS:
            assert mine.apply_chat_template(chat) == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        with pytest.raises(ChatTemplateError, match="bad role tool"):
            mine.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_list_form_sandbox_and_missing(smollm2_dir: Path, tmp_path: Path) -> None:
    listed = _with_template(smollm2_dir, tmp_path / "list", [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
                                                             {"name": "tool_use", "template": "T"}])
    assert load_tokenizer(listed).apply_chat_template([{"role": "user", "content": "x"}]) == "Dx"
    escape = _with_template(smollm2_dir, tmp_path / "esc", "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        load_tokenizer(escape).apply_chat_template([{"role": "user", "content": "x"}])
    none = _with_template(smollm2_dir, tmp_path / "none", "")
    with pytest.raises(ConfigError, match="no chat template"):
        load_tokenizer(none).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_eos_ids_gathered_from_config_files(smollm2_dir: Path, tmp_path: Path) -> None:
    folder = _with_template(smollm2_dir, tmp_path / "eos", "x")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert load_tokenizer(folder).eos_token_ids == [0, 2]


def _split_char_ids(tok: Tokenizer, text: str) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "sample must split a character over tokens"
    return ids


def _stream(decoder, ids: list[int]) -> list[str]:
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_never_splits_utf8(ours: Tokenizer) -> None:
    for text in SAMPLES[2:4] + ["🏽🏽🏽 ⿰ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𠜎𠜱𠝹"]:
        ids = ours.encode(text, add_special_tokens=False)
        dec = ours.stream_decoder()
        assert isinstance(dec, ByteLevelStreamDecoder)
        parts = _stream(dec, ids)
        assert "".join(parts) == ours.decode(ids) == text
        assert not any("\ufffd" in p for p in parts)
    ids = _split_char_ids(ours, "👨‍👩‍👧‍👦")
    dec = ours.stream_decoder()
    assert dec.push(ids[0]) == ""  # first byte(s) of the emoji alone: nothing yet
    # special tokens are skipped unless asked for
    ids = ours.encode("<|im_start|>hi<|im_end|>")
    assert "".join(_stream(ours.stream_decoder(), ids)) == "hi"
    assert "".join(_stream(ours.stream_decoder(skip_special_tokens=False), ids)) == "<|im_start|>hi<|im_end|>"
    # a dangling partial character is flushed as one replacement character
    dec = ours.stream_decoder()
    assert dec.push(_split_char_ids(ours, "👍")[0]) == "" and dec.flush() == "\ufffd"


def _byte_fallback_tokenizer() -> Tokenizer:
    """A SentencePiece-style vocabulary (Metaspace, byte fallback): not byte-level BPE."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ("▁", "a", "b", "▁a", "▁b"):
        vocab[piece] = len(vocab)
    backend = Backend(models.BPE(vocab, [("▁", "a"), ("▁", "b")], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return Tokenizer(backend, config={"eos_token": "</s>", "bos_token": "<s>"})


def test_window_stream_decoder_on_byte_fallback_vocab() -> None:
    tok = _byte_fallback_tokenizer()
    text = "a b 日本 🎉 b"
    ids = tok.encode(text)
    assert any(tok.decode([i]) == "\ufffd" for i in ids)
    dec = tok.stream_decoder()
    assert isinstance(dec, WindowStreamDecoder)
    parts = _stream(dec, ids)
    assert "".join(parts) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in parts)
    assert tok.eos_token_ids == [2] and tok.bos_token_id == 1
