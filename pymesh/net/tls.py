"""TLS material derived from a node's Ed25519 identity.

Each node presents a self-signed X.509 certificate whose key *is* its identity key, so
a dialer that knows the peer ID it wants checks the certificate's public key against it
(:func:`check_peer_certificate`). No certificate authority is involved.
"""

from __future__ import annotations

import datetime
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from pymesh.errors import IdentityError
from pymesh.net.config import ALPN
from pymesh.proto.identity import Identity, PeerID

_CERT_CACHE: dict[bytes, x509.Certificate] = {}


def certificate_for(identity: Identity) -> x509.Certificate:
    """A self-signed certificate for ``identity`` (cached per key)."""
    cached = _CERT_CACHE.get(identity.public_key)
    if cached is not None:
        return cached
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id.to_text())])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(identity.private_key, algorithm=None)
    )
    _CERT_CACHE[identity.public_key] = cert
    return cert


def peer_id_of_certificate(cert: x509.Certificate) -> PeerID:
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(
            f"the peer's TLS certificate holds a {type(key).__name__}, not an Ed25519 key: it is not a pymesh node"
        )
    return PeerID(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def check_peer_certificate(cert: x509.Certificate | None, expected: PeerID) -> PeerID:
    """Raise IdentityError unless ``cert``'s key is ``expected``."""
    if cert is None:
        raise IdentityError(f"the peer presented no TLS certificate; expected peer {expected}")
    actual = peer_id_of_certificate(cert)
    if actual != expected:
        raise IdentityError(
            f"pinned key mismatch: expected peer {expected} but the server's certificate belongs to "
            f"{actual}; the address points at another node (check the peer ID in the address/DHT record)"
        )
    return actual


def check_peer_certificate_der(der: bytes | None, expected: PeerID) -> PeerID:
    if der is None:
        return check_peer_certificate(None, expected)
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError(f"the peer's TLS certificate cannot be parsed: {exc}") from None
    return check_peer_certificate(cert, expected)


def server_ssl_context(identity: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_TICKET
    ctx.set_alpn_protocols([ALPN])
    cert = certificate_for(identity)
    # SSLContext loads key material only from files: never a plain temp file (Identity.pem_file).
    with identity.pem_file(cert.public_bytes(serialization.Encoding.PEM)) as (path, password):
        ctx.load_cert_chain(path, password=password)
    return ctx


def client_ssl_context() -> ssl.SSLContext:
    """Verification is by pinned key (check_peer_certificate), not by a CA chain."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([ALPN])
    return ctx
