"""Identity, addresses and the CLI entry point: the pieces every part shares."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pymesh.errors import ConfigError, IdentityError
from pymesh.proto.addr import parse_addr
from pymesh.proto.identity import Identity, PeerID, verify_signature


def test_peer_id_text_round_trip_and_signatures(tmp_path):
    ident = Identity.generate()
    text = ident.peer_id.to_text()
    assert len(text) == 52 and text == text.lower()
    assert PeerID.from_text(text) == ident.peer_id
    sig = ident.sign(b"hello")
    assert ident.peer_id.verify(sig, b"hello")
    assert not ident.peer_id.verify(sig, b"hellO")
    other = Identity.generate()
    assert not other.peer_id.verify(sig, b"hello")
    assert not verify_signature(b"short", sig, b"hello")
    assert not verify_signature(ident.public_key, b"\x00" * 10, b"hello")
    assert len(ident.node_id) == 20


def test_identity_file_is_created_once_and_private(tmp_path):
    path = tmp_path / "sub" / "node.key"
    a = Identity.load_or_create(path)
    b = Identity.load_or_create(path)
    assert a.peer_id == b.peer_id
    assert path.stat().st_mode & 0o077 == 0
    path.write_text("not a key")
    with pytest.raises(IdentityError, match="not a PEM private key"):
        Identity.load(path)


@pytest.mark.parametrize("bad", ["", "abc", "a" * 51, "!" * 52])
def test_bad_peer_id_text_is_rejected(bad):
    with pytest.raises(IdentityError):
        PeerID.from_text(bad)


def test_addresses_in_both_spellings():
    pid = Identity.from_seed(b"\x01" * 32).peer_id
    assert parse_addr("127.0.0.1:9000").hostport() == "127.0.0.1:9000"
    a = parse_addr(f"/ip4/192.168.1.10/tcp/9000/p2p/{pid}")
    assert (a.host, a.port, a.proto, a.peer_id) == ("192.168.1.10", 9000, "tcp", pid)
    b = parse_addr("/ip4/10.0.0.1/udp/9001/quic")
    assert (b.port, b.proto) == (9001, "quic")
    c = parse_addr("[::1]:7000")
    assert c.host == "::1" and c.hostport() == "[::1]:7000"
    assert parse_addr(a.to_multiaddr()) == a


@pytest.mark.parametrize("bad", ["", "localhost", "1.2.3.4:0", "1.2.3.4:70000", "/ip4/1.2.3.4",
                                 "/ip4/1.2.3.4/sctp/5", "[::1]9000", "host:port",
                                 "/ip4/1.2.3/udp/9000", "/ip4/1.2.3.256/udp/1", "/ip6/::zz/udp/1"])
def test_bad_addresses_say_what_is_wrong(bad):
    with pytest.raises(ConfigError):
        parse_addr(bad)


def test_cli_version_and_help():
    out = subprocess.run([sys.executable, "-m", "pymesh", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("pymesh ")
    out = subprocess.run([sys.executable, "-m", "pymesh", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for cmd in ("bootstrap", "worker", "client", "generate", "bench", "monitor", "demo"):
        assert cmd in out.stdout
