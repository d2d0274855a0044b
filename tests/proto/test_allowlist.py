"""PeerAllowlist: the ``--allow-peers FILE`` format (one peer ID a line, comments, errors by line)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from pymesh.errors import ConfigError
from pymesh.proto.allowlist import MAX_ALLOWLIST_BYTES, PeerAllowlist, allowed
from pymesh.proto.identity import Identity, PeerID


def _peer(n: int) -> PeerID:
    return Identity.from_seed(bytes([n]) * 32).peer_id


def test_load_with_comments_blank_lines_and_padding(tmp_path: Path) -> None:
    a, b, c = _peer(1), _peer(2), _peer(3)
    f = tmp_path / "allow.txt"
    f.write_text(f"# friends\n\n  {a}  \n{b} # laptop\n\t\n#{c}\n", encoding="utf-8")
    allow = PeerAllowlist.load(f)
    assert len(allow) == 2
    assert allow.allows(a) and allow.allows(b) and not allow.allows(c)
    assert a in allow and c not in allow
    assert list(allow) == sorted([a, b])
    assert allowed(None, c) and allowed(allow, a) and not allowed(allow, c)


def test_a_bad_line_names_the_file_and_the_line(tmp_path: Path) -> None:
    f = tmp_path / "allow.txt"
    f.write_text(f"{_peer(1)}\n# ok\nnot-a-peer-id\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        PeerAllowlist.load(f)
    assert str(f) in str(info.value) and "line 3" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"# nobody\n\n", b"\xff\xfe garbage"])
def test_empty_or_binary_files_are_refused(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "allow.txt"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=str(f)):
        PeerAllowlist.load(f)


def test_missing_and_huge_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        PeerAllowlist.load(tmp_path / "absent.txt")
    big = tmp_path / "big.txt"
    with big.open("wb") as fh:
        fh.truncate(MAX_ALLOWLIST_BYTES + 1)
    with pytest.raises(ConfigError, match="too large"):
        PeerAllowlist.load(big)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_parse_raises_only_config_error(text: str) -> None:
    try:
        allow = PeerAllowlist.parse(text)
    except ConfigError:
        return
    assert len(allow) >= 1
