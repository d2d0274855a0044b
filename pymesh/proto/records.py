"""pymesh worker records: who serves which blocks of which model, signed by the worker.

A record is a bencoded dictionary with short keys, signed with the worker's Ed25519
identity key over ``b"pymesh-record\\0" + bencode(fields without "sig")``. The signer's
public key is in the record, so anyone can verify it without asking the network, and a
record can only ever replace a record of the same key (records are stored keyed by
signer, newest timestamp wins).

Floats are carried as integers (microseconds, milli-tokens, milliseconds) so encoding
is exact; :meth:`WorkerRecord.signed` rounds them first, which makes a signed record
equal to its decoded copy.

Records live at two DHT targets: :func:`model_target` (per *base* model: every
quantization of one model shares it, so a client sees them all) and :data:`ALL_TARGET`
(every record, for ``list_models`` and the monitor).

Model ids are ``<name>@<fingerprint>`` plus, for weights computed in a block format, a
``:<quantization>`` suffix (``smollm2@0123456789ab:q4_1``); :func:`split_model_id` splits
the base id from the suffix. Names may contain ``:`` but never ``@``, so the suffix is
what follows ``:`` after the ``@``. A record of a file mixing weight types names the type
of most of its block weights in the suffix and lists them all in ``wt`` (bounded:
:data:`MAX_WEIGHT_TYPES` names of :data:`WEIGHT_TYPES`, counts up to :data:`MAX_TENSORS`).

Every field of a record is text or numbers chosen by a stranger, so the parser is strict
(and :meth:`WorkerRecord.signed` applies the same rules, so a worker learns at once that a
record it signs would be refused): model ids use letters, digits and ``. - _ @ :`` only
(no markup such as ``[/]``, no control or escape characters); a host is an IP address or
a DNS name; transports are :class:`~pymesh.proto.vocab.Transport` names; spans lie within
:data:`MAX_BLOCKS`; speeds, cache sizes and session counts are bounded. A reader that
knows the model's layer count also checks ``stop`` against it (:meth:`WorkerRecord.fits`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import time
from dataclasses import dataclass, field, replace

from pymesh import PROTOCOL_VERSION
from pymesh.errors import DecodeError, VersionMismatch
from pymesh.proto.bencode import BencodeError, decode_untrusted, encode
from pymesh.proto.identity import Identity, PeerID, verify_signature
from pymesh.proto.reach import Reach, ReachError
from pymesh.proto.vocab import Transport, WorkerState

MAX_RECORD_BYTES = 700
MAX_MODEL_ID = 160
#: Longest name :func:`sanitize_model_name` returns (room is left for ``@<fingerprint>``).
MAX_MODEL_NAME = 96
MAX_HOST = 253
#: Largest block index + 1 a record may claim; models have at most a few hundred layers.
MAX_BLOCKS = 4096
MAX_CACHE_TOKENS = 1 << 40
MAX_SESSIONS = 1 << 20
MAX_BLOCK_MS = 3_600_000.0          # one hour per block: anything slower is a lie or a bug
MAX_TOKENS_PER_S = 1e9
TRANSPORTS = tuple(t.value for t in Transport)
_MODEL_ID = re.compile(r"[A-Za-z0-9._@:-]+")
_NAME_BAD = re.compile(r"[^A-Za-z0-9._:-]+")
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: weight types a record may name (GGML's type names, and "float" for matrices computed in
#: the run dtype): the quantization suffix of a model id is one of QUANT_LABELS, a mixed
#: file's ``wt`` counts any of these
QUANT_LABELS = ("q8_0", "q4_0", "q4_1")
WEIGHT_TYPES = ("float", "f32", "f16", "bf16", "f64", "q8_0", "q8_1", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k",
                "q4_k", "q5_k", "q6_k", "q8_k", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs",
                "iq3_s", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0", "i8", "i16", "i32", "i64")
MAX_WEIGHT_TYPES = 8
#: most tensors of one type a ``wt`` entry may count
MAX_TENSORS = 1 << 20
STATES = tuple(s.value for s in WorkerState)   # ("joining", "online", "offline")
SIGN_DOMAIN = b"pymesh-record\0"
ALL_TARGET = hashlib.sha1(b"pymesh:all-records").digest()
_NO_PEER = PeerID(bytes(32))


def split_model_id(model_id: str) -> tuple[str, str | None]:
    """``(base id, quantization)`` of a model id: ``"m@0123:q4_1"`` -> ``("m@0123", "q4_1")``,
    ``"m@0123"`` -> ``("m@0123", None)``; an id without ``@`` (``"echo"``) is its own base.
    Pure; does not validate (see :func:`is_valid_model_id`)."""
    name, at, rest = model_id.partition("@")
    fp, colon, quant = rest.partition(":")
    if not at or not colon:
        return model_id, None
    return f"{name}@{fp}", quant


def base_model_id(model_id: str) -> str:
    """The id without its quantization suffix (what every quantization of a model shares)."""
    return split_model_id(model_id)[0]


def model_target(model_id: str) -> bytes:
    """DHT target under which the records of ``model_id`` are stored: that of its *base* id,
    so a lookup of any quantization finds the records of all of them."""
    return hashlib.sha1(b"pymesh:model:" + base_model_id(model_id).encode("utf-8")).digest()


def is_valid_model_id(text: str) -> bool:
    """Whether ``text`` may name a model in a record: 1..MAX_MODEL_ID ASCII letters, digits,
    ``.``, ``-``, ``_``, ``@`` and ``:`` (nothing a terminal or a markup renderer interprets),
    at most one ``@``, and a quantization suffix after it only from :data:`QUANT_LABELS`."""
    if not 0 < len(text) <= MAX_MODEL_ID or _MODEL_ID.fullmatch(text) is None or text.count("@") > 1:
        return False
    quant = split_model_id(text)[1]
    return quant is None or quant in QUANT_LABELS


def check_weight_types(types: object) -> tuple[tuple[str, int], ...]:
    """``{name: tensor count}`` (str or bytes keys) as a record carries it, sorted by name;
    ValueError unless at most MAX_WEIGHT_TYPES names of WEIGHT_TYPES with counts 1..MAX_TENSORS."""
    if not isinstance(types, (dict, tuple, list)):
        raise ValueError("weight types must map type names to tensor counts")
    items = list(types.items()) if isinstance(types, dict) else list(types)
    if len(items) > MAX_WEIGHT_TYPES:
        raise ValueError(f"weight types list {len(items)} types; at most {MAX_WEIGHT_TYPES}")
    out: dict[str, int] = {}
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ValueError("weight types must be (name, count) pairs")
        key, count = item
        name = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        if not isinstance(name, str) or name not in WEIGHT_TYPES:
            raise ValueError(f"weight type {ascii(str(name)[:16])} is not one of GGML's type names")
        if not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= MAX_TENSORS:
            raise ValueError(f"weight type {name} counts {str(count)[:24]} tensors; must be 1..{MAX_TENSORS}")
        out[name] = count
    return tuple(sorted(out.items()))


def sanitize_model_name(name: str) -> str:
    """A model name built from ``name`` (e.g. a folder's name) that a record accepts.

    Pure. Every run of characters outside ASCII letters, digits, ``.``, ``-``, ``_`` and
    ``:`` becomes one ``-`` (``@`` too: it separates the name from the fingerprint, so
    ``f"{sanitize_model_name(folder)}@{fingerprint}"`` is a valid model id); leading and
    trailing ``-`` and ``.`` are stripped, the result is cut to :data:`MAX_MODEL_NAME`
    characters, and an empty result becomes ``"model"``. Callers log a line when the result
    differs from ``name`` so the user knows which name the swarm sees.
    """
    out = _NAME_BAD.sub("-", name).strip("-.")[:MAX_MODEL_NAME].strip("-.")
    return out or "model"


def is_valid_host(text: str) -> bool:
    """Whether ``text`` is an IPv4/IPv6 address (no zone id) or a DNS name of ASCII labels."""
    if not 0 < len(text) <= MAX_HOST or not text.isascii() or "%" in text:
        return False
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    return all(_DNS_LABEL.fullmatch(label) for label in text.split("."))


class RecordError(DecodeError):
    """Record bytes are malformed, too large, or do not carry a valid signature."""


class RecordVersionMismatch(RecordError, VersionMismatch):
    """A record was written by a peer speaking another protocol version."""

    def __init__(self, ours: int, theirs: object) -> None:
        VersionMismatch.__init__(self, ours, theirs)


@dataclass(frozen=True)
class WorkerRecord:
    version: int = PROTOCOL_VERSION
    peer_id: PeerID = _NO_PEER
    model_id: str = ""
    start: int = 0
    stop: int = 0
    host: str = ""
    port: int = 0
    transports: tuple[str, ...] = ("quic", "tcp")
    state: WorkerState = WorkerState.ONLINE
    block_ms: float = 0.0
    tokens_per_s: float = 0.0
    cache_tokens_free: int = 0
    cache_tokens_total: int = 0
    sessions: int = 0
    timestamp: float = 0.0
    #: a mixed file's weight types, ``(("f32", 61), ("q8_0", 1))``; empty when the suffix says all
    weight_types: tuple[tuple[str, int], ...] = ()
    #: how to reach the worker when ``host:port`` does not answer from outside (behind NAT):
    #: through the listed relays, or a hole-punched QUIC path; None: directly
    reach: Reach | None = None
    signature: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        # A plain string naming a state becomes the member; anything else stays, for
        # _check_local to refuse (a record is only checked when signed).
        if not isinstance(self.state, WorkerState) and self.state in STATES:
            object.__setattr__(self, "state", WorkerState(self.state))

    # -- helpers ---------------------------------------------------------------------------
    def covers(self, block: int) -> bool:
        return self.start <= block < self.stop

    def fits(self, num_blocks: int) -> bool:
        """Whether the span lies within a model of ``num_blocks`` blocks (readers that know
        the model's layer count drop records that claim blocks past its end)."""
        return 0 <= self.start < self.stop <= num_blocks

    @property
    def live(self) -> bool:
        return self.state != WorkerState.OFFLINE

    @property
    def base_id(self) -> str:
        return base_model_id(self.model_id)

    @property
    def quant(self) -> str | None:
        """The quantization the worker computes in (None: float weights)."""
        return split_model_id(self.model_id)[1]

    def _fields(self) -> dict[bytes, object]:
        return {
            b"v": self.version,
            b"k": self.peer_id.key,
            b"m": self.model_id,
            b"s": self.start,
            b"e": self.stop,
            b"h": self.host,
            b"p": self.port,
            b"t": list(self.transports),
            b"st": str(self.state),
            b"bm": round(self.block_ms * 1000),
            b"tp": round(self.tokens_per_s * 1000),
            b"cf": self.cache_tokens_free,
            b"ct": self.cache_tokens_total,
            b"n": self.sessions,
            b"ts": round(self.timestamp * 1000),
            # only when present, so a float worker's record is byte for byte what it was
            **({b"wt": {k.encode(): v for k, v in self.weight_types}} if self.weight_types else {}),
            **({b"rc": self.reach.to_wire()} if self.reach is not None else {}),
        }

    def _check_local(self) -> None:
        """The parser's rules, for a record this node is about to sign (ValueError)."""
        if not 0 <= self.start < self.stop <= MAX_BLOCKS:
            raise ValueError(f"record span [{self.start}, {self.stop}) must be non-empty within 0..{MAX_BLOCKS}")
        if self.state not in STATES:
            raise ValueError(f"record state {self.state!r} is not one of {STATES}")
        if not is_valid_model_id(self.model_id):
            raise ValueError(f"model id {self.model_id[:40]!r} must be 1..{MAX_MODEL_ID} letters, digits "
                             f"or . - _ @ :, one '@', and a quantization suffix only of {QUANT_LABELS} "
                             "(use sanitize_model_name for a folder's name)")
        if self.weight_types:
            check_weight_types(self.weight_types)
        if not is_valid_host(self.host):
            raise ValueError(f"record host {self.host[:40]!r} is not an IP address or DNS name; "
                             "set --announce-addr to one")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"record port {self.port} is outside 0..65535")
        if not 0 < len(self.transports) <= 4 or any(t not in TRANSPORTS for t in self.transports):
            raise ValueError(f"record transports {self.transports!r} must be 1..4 of {TRANSPORTS}")
        for name, v, cap in (("block_ms", self.block_ms, MAX_BLOCK_MS),
                             ("tokens_per_s", self.tokens_per_s, MAX_TOKENS_PER_S),
                             ("cache_tokens_free", self.cache_tokens_free, MAX_CACHE_TOKENS),
                             ("cache_tokens_total", self.cache_tokens_total, MAX_CACHE_TOKENS),
                             ("sessions", self.sessions, MAX_SESSIONS)):
            if not (math.isfinite(v) and 0 <= v <= cap):
                raise ValueError(f"record field {name}={v!r} must be finite and within 0..{cap:g}")

    def signed(self, identity: Identity, *, timestamp: float | None = None) -> "WorkerRecord":
        """A copy with peer_id, timestamp and signature set by ``identity``."""
        ts = time.time() if timestamp is None else timestamp
        self._check_local()
        rec = replace(
            self, peer_id=identity.peer_id, timestamp=round(ts * 1000) / 1000,
            block_ms=round(self.block_ms * 1000) / 1000,
            tokens_per_s=round(self.tokens_per_s * 1000) / 1000, signature=b"",
            weight_types=check_weight_types(self.weight_types) if self.weight_types else (),
        )
        body = encode(rec._fields())
        out = replace(rec, signature=identity.sign(SIGN_DOMAIN + body))
        if len(out.to_bytes()) > MAX_RECORD_BYTES:
            raise ValueError(f"record exceeds {MAX_RECORD_BYTES} bytes; shorten model id or host")
        return out

    def verify(self) -> bool:
        return verify_signature(self.peer_id.key, self.signature, SIGN_DOMAIN + encode(self._fields()))

    def to_bytes(self) -> bytes:
        d = self._fields()
        d[b"sig"] = self.signature
        return encode(d)

    @classmethod
    def from_bytes_untrusted(cls, data: bytes, *, expected_version: int = PROTOCOL_VERSION,
                             require_signature: bool = True) -> "WorkerRecord":
        """Parse and verify a record. Raises RecordError (RecordVersionMismatch for another
        protocol version)."""
        if len(data) > MAX_RECORD_BYTES:
            raise RecordError(f"record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
        try:
            d = decode_untrusted(data, max_size=MAX_RECORD_BYTES, max_depth=4)
        except BencodeError as exc:
            raise RecordError(f"record is not valid bencode: {exc}") from None
        if not isinstance(d, dict):
            raise RecordError("record must be a dictionary")
        version = d.get(b"v")
        if version != expected_version:
            raise RecordVersionMismatch(expected_version, version)

        def num(key: bytes, lo: int = 0, hi: int = 2**53) -> int:
            v = d.get(key)
            if not isinstance(v, int) or not lo <= v <= hi:
                raise RecordError(f"record field {key.decode()!r} must be an integer in {lo}..{hi}")
            return v

        def text(key: bytes, cap: int) -> str:
            v = d.get(key)
            if not isinstance(v, bytes) or len(v) > cap:
                raise RecordError(f"record field {key.decode()!r} must be a string of <= {cap} bytes")
            try:
                return v.decode("utf-8")
            except UnicodeDecodeError:
                raise RecordError(f"record field {key.decode()!r} is not UTF-8") from None

        key = d.get(b"k")
        sig = d.get(b"sig")
        if not isinstance(key, bytes) or len(key) != 32:
            raise RecordError("record key 'k' must be 32 bytes")
        if not isinstance(sig, bytes) or len(sig) != 64:
            raise RecordError("record signature 'sig' must be 64 bytes")
        transports = d.get(b"t")
        if not isinstance(transports, list) or not 0 < len(transports) <= 4 or \
                not all(isinstance(t, bytes) and t.decode("ascii", "replace") in TRANSPORTS for t in transports):
            raise RecordError(f"record field 't' must list 1..4 transports of {TRANSPORTS}")
        known = {b"v", b"k", b"m", b"s", b"e", b"h", b"p", b"t", b"st", b"bm", b"tp",
                 b"cf", b"ct", b"n", b"ts", b"wt", b"rc", b"sig"}
        if set(d) - known:
            raise RecordError(f"record has unknown fields {sorted(set(d) - known)!r}")
        rec = cls(
            version=version,
            peer_id=PeerID(key),
            model_id=text(b"m", MAX_MODEL_ID),
            start=num(b"s", 0, MAX_BLOCKS - 1),
            stop=num(b"e", 1, MAX_BLOCKS),
            host=text(b"h", MAX_HOST),
            port=num(b"p", 0, 65535),
            transports=tuple(t.decode("ascii") for t in transports),  # type: ignore[union-attr]
            state=_state_untrusted(text(b"st", 16)),
            block_ms=num(b"bm", 0, round(MAX_BLOCK_MS * 1000)) / 1000,
            tokens_per_s=num(b"tp", 0, round(MAX_TOKENS_PER_S * 1000)) / 1000,
            cache_tokens_free=num(b"cf", 0, MAX_CACHE_TOKENS),
            cache_tokens_total=num(b"ct", 0, MAX_CACHE_TOKENS),
            sessions=num(b"n", 0, MAX_SESSIONS),
            timestamp=num(b"ts") / 1000,
            weight_types=_weight_types_untrusted(d.get(b"wt")),
            reach=_reach_untrusted(d.get(b"rc")),
            signature=sig,
        )
        if rec.start >= rec.stop:
            raise RecordError(f"record span [{rec.start}, {rec.stop}) is empty")
        if not is_valid_model_id(rec.model_id):
            raise RecordError(f"record model id {ascii(rec.model_id[:40])} is empty, has characters "
                              "other than letters, digits and . - _ @ :, or an unknown quantization suffix")
        if not is_valid_host(rec.host):
            raise RecordError(f"record host {ascii(rec.host[:40])} is not an IP address or DNS name")
        if require_signature and not rec.verify():
            raise RecordError(f"record signature does not verify for key {rec.peer_id.short()}")
        return rec


def _state_untrusted(text: str) -> WorkerState:
    try:
        return WorkerState.parse_untrusted(text)
    except DecodeError as exc:
        raise RecordError(f"invalid record: {exc}") from None


def _weight_types_untrusted(value: object) -> tuple[tuple[str, int], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict) or not value:
        raise RecordError("record field 'wt' must be a non-empty dictionary of weight type counts")
    try:
        return check_weight_types(value)
    except ValueError as exc:
        raise RecordError(f"record field 'wt': {exc}") from None


def _reach_untrusted(value: object) -> Reach | None:
    if value is None:
        return None
    try:
        return Reach.from_wire_untrusted(value)
    except ReachError as exc:
        raise RecordError(f"record field 'rc': {exc}") from None
