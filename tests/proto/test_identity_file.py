"""Private keys never touch a readable or temporary file (issue 11, item 9).

Before: ``Identity.save`` wrote through ``KEY.tmp`` opened without O_EXCL, so a
pre-existing world-readable ``KEY.tmp`` kept its mode (the key ended up 0644) and a
symlink planted there received the key; the TLS server context wrote the key in clear to
a file in the system temp folder at every start.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from pymesh.proto.identity import Identity


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_file_is_0600_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    ident = Identity.load_or_create(path)
    assert _mode(path) == 0o600 and _mode(path.parent) & 0o077 == 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["node.key"]
    assert Identity.load_or_create(path).peer_id == ident.peer_id
    # Overwriting an existing key file: still 0600, still no temp file left behind.
    other = Identity.generate()
    other.save(path)
    assert Identity.load(path).peer_id == other.peer_id and _mode(path) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["node.key"]


def test_a_planted_temp_file_or_symlink_never_receives_the_key(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    planted = path.with_name(path.name + ".tmp")           # the name the old code wrote through
    planted.write_bytes(b"")
    planted.chmod(0o644)
    Identity.generate().save(path)
    assert _mode(path) == 0o600, "the key landed in a file that was world-readable before"

    path2 = tmp_path / "second.key"
    bait = tmp_path / "attacker-readable.txt"
    bait.write_bytes(b"")
    path2.with_name(path2.name + ".tmp").symlink_to(bait)
    Identity.generate().save(path2)
    assert bait.read_bytes() == b"", "the key was written through a planted symlink"
    assert not path2.is_symlink() and _mode(path2) == 0o600


def test_exclusive_create_refuses_an_existing_file_or_symlink(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        Identity.generate().save(path, exist_ok=False)
    assert not (tmp_path / "elsewhere").exists()


def test_tls_server_context_writes_no_key_to_a_temp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pymesh.net.tls import server_ssl_context

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    created: list[str] = []
    real_mkstemp = tempfile.mkstemp

    def spy(*args: object, **kwargs: object) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)  # type: ignore[call-overload]
        created.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    server_ssl_context(Identity.generate())
    if hasattr(os, "memfd_create"):
        assert created == [], "the TLS key went through a temporary file"
    assert list(tmp_path.iterdir()) == []


def test_pem_file_without_memfd_holds_only_an_encrypted_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    ident = Identity.generate()
    monkeypatch.delattr(os, "memfd_create", raising=False)
    with ident.pem_file() as (path, password):
        body = Path(path).read_bytes()
        assert password is not None and b"ENCRYPTED PRIVATE KEY" in body
        assert _mode(Path(path)) == 0o600
        from pymesh.net.tls import certificate_for
        from cryptography.hazmat.primitives import serialization

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert = certificate_for(ident).public_bytes(serialization.Encoding.PEM)
        Path(path).write_bytes(cert + body)
        ctx.load_cert_chain(path, password=password)
    assert not Path(path).exists()
