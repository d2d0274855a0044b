"""Node identity: an Ed25519 key pair, its peer ID, and the key file it lives in.

The peer ID *is* the 32-byte Ed25519 public key; its text form is lowercase
RFC 4648 base32 without padding (52 characters), used in logs, in ``/p2p/<id>``
address suffixes and in the monitor. Because the ID carries the key, anyone holding
an ID can verify signatures made by that node without asking the network.

The Kademlia node ID (160 bits, BEP 5) is ``sha1(public key)``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pymesh.errors import IdentityError

PEER_ID_TEXT_LEN = 52


@dataclass(frozen=True, order=True)
class PeerID:
    """A node's public identity: its raw Ed25519 public key (32 bytes)."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != 32:
            raise IdentityError("a peer ID is a 32-byte Ed25519 public key")

    @classmethod
    def from_text(cls, text: str) -> "PeerID":
        """Parse the text form; raises IdentityError with what was wrong."""
        text = text.strip()
        if len(text) != PEER_ID_TEXT_LEN:
            raise IdentityError(
                f"peer ID {text!r} has {len(text)} characters; expected {PEER_ID_TEXT_LEN} "
                "(base32 of an Ed25519 public key, as printed by `pymesh bootstrap`)"
            )
        try:
            raw = base64.b32decode(text.upper() + "====")
        except (ValueError, base64.binascii.Error) as exc:  # type: ignore[attr-defined]
            raise IdentityError(f"peer ID {text!r} is not valid base32: {exc}") from None
        return cls(raw)

    def to_text(self) -> str:
        return base64.b32encode(self.key).decode("ascii").rstrip("=").lower()

    def short(self) -> str:
        """A short prefix for log lines and tables."""
        return self.to_text()[:10]

    @property
    def node_id(self) -> bytes:
        """160-bit Kademlia node ID derived from the key."""
        return hashlib.sha1(self.key).digest()

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True if ``signature`` is this peer's Ed25519 signature of ``message``."""
        return verify_signature(self.key, signature, message)

    def __str__(self) -> str:
        return self.to_text()


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Ed25519 verification that never raises on malformed input."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """A node's private key. Create with :meth:`generate` or :meth:`load_or_create`."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = PeerID(raw)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        """Deterministic identity from a 32-byte seed (tests and simulations)."""
        if len(seed) != 32:
            raise IdentityError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Identity":
        data = Path(path).read_bytes()
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"identity file {path} is not a PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"identity file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> "Identity":
        """Load the key at ``path``; create it (mode 0600) if the file does not exist. Two
        processes racing to create it end up with the same identity (the loser loads it)."""
        p = Path(path)
        if p.exists():
            return cls.load(p)
        ident = cls.generate()
        try:
            ident.save(p, exist_ok=False)
        except FileExistsError:
            return cls.load(p)
        return ident

    def save(self, path: str | os.PathLike[str], *, exist_ok: bool = True) -> None:
        """Write the key (PKCS#8 PEM) to ``path``: created with mode 0600 (its folder 0700 when
        created here), never through a symlink or into a file that already existed. Replacing
        an existing key goes through a same-folder file with a random name, created the same
        way and removed on failure; ``exist_ok=False`` raises FileExistsError instead."""
        p = Path(path)
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = self._pem()
        try:
            _write_new_private(p, pem)
            return
        except FileExistsError:
            if not exist_ok:
                raise
        tmp = p.with_name(f".{p.name}.{secrets.token_hex(8)}.tmp")
        _write_new_private(tmp, pem)
        try:
            os.replace(tmp, p)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextmanager
    def pem_file(self, prefix: bytes = b"") -> Iterator[tuple[str, bytes | None]]:
        """``with identity.pem_file(cert_pem) as (path, password)``: a path from which OpenSSL
        reads ``prefix`` and this key (``ssl.SSLContext.load_cert_chain`` takes only paths),
        and the password to pass with it. On Linux the file is anonymous memory (memfd), so
        the key touches no file system; elsewhere it is a 0600 temporary file holding the key
        encrypted under a random password that exists only in this process, removed on exit."""
        memfd = getattr(os, "memfd_create", None)
        if memfd is not None and os.path.isdir("/proc/self/fd"):
            fd = memfd("pymesh-key", getattr(os, "MFD_CLOEXEC", 0))
            try:
                _write_all(fd, prefix + self._pem())
                yield f"/proc/self/fd/{fd}", None
            finally:
                os.close(fd)
            return
        password = secrets.token_hex(32).encode("ascii")
        sealed = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(password),
        )
        fd, name = tempfile.mkstemp(prefix="pymesh-sealed-", suffix=".pem")
        try:
            _write_all(fd, prefix + sealed)
            os.close(fd)
            fd = -1
            yield name, password
        finally:
            if fd >= 0:
                os.close(fd)
            os.unlink(name)

    def _pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    @property
    def private_key(self) -> Ed25519PrivateKey:
        return self._private

    @property
    def public_key(self) -> bytes:
        return self.peer_id.key

    @property
    def node_id(self) -> bytes:
        return self.peer_id.node_id

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_new_private(path: Path, data: bytes) -> None:
    """Create ``path`` (O_EXCL: never an existing file or a symlink) with mode 0600 from the
    start, write ``data`` and fsync it; a partial file is removed if writing fails."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def default_identity_path(role: str, home: Path | None = None) -> Path:
    """Where a role keeps its key unless ``--identity`` says otherwise: ``home`` (the
    caller passes ``settings.runtime.home``, i.e. PYMESH_HOME), default ``~/.pymesh``."""
    base = home if home is not None else Path.home() / ".pymesh"
    return base / f"{role}.key"
