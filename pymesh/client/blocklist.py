"""Convictions that outlive the client: the blocklist file and the evidence behind each entry.

A worker a verified-inference check proved wrong is convicted (:meth:`BanBook.convict
<pymesh.client.bans.BanBook.convict>`): banned for the rest of the process. So that the next
run does not route through it either, the conviction is also written to a **blocklist**, a
JSON file (default ``<PYMESH_HOME>/blocklist.json``)::

    {"<peer id text>": {"why": "...", "when": <unix time>, "evidence": "<file>" | null}, ...}

and the **evidence** that convicted it to ``<blocklist folder>/evidence/``: a JSON file
(``<utc time>-<peer short>.json``: the peer, the kind of proof, the why, the signed receipts
as hex, a JSON detail: errors, tolerance, checker peers, step, span) and, beside it, the
tensors (inputs and outputs of the checked step) in a ``.safetensors`` file, so anyone can
re-run the span and judge the claim. Every write is atomic (a temporary file, then rename).

The blocklist is a file another program (or person) may have edited: :meth:`Blocklist.load`
reads at most :data:`MAX_BLOCKLIST_BYTES` and :data:`MAX_ENTRIES` entries and raises one
:class:`BlocklistError` naming the file and what to do for anything malformed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from pymesh.errors import ConfigError, IdentityError
from pymesh.proto.identity import PeerID

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: a blocklist larger than this is not one pymesh wrote (an entry is ~200 bytes)
MAX_BLOCKLIST_BYTES = 8 * 1024 * 1024
#: entries a blocklist may hold
MAX_ENTRIES = 100_000
#: longest ``why`` / evidence path kept from a file (characters)
MAX_TEXT = 4096
#: an evidence JSON file larger than this is refused by :func:`read_evidence`
MAX_EVIDENCE_JSON_BYTES = 16 * 1024 * 1024
#: an evidence tensor file larger than this is refused by :func:`read_evidence`
MAX_EVIDENCE_TENSOR_BYTES = 2 * 1024 * 1024 * 1024
#: the folder, beside the blocklist, that evidence files go to
EVIDENCE_FOLDER = "evidence"


class BlocklistError(ConfigError):
    """A blocklist or evidence file is unreadable or malformed (the message names the file)."""


@dataclass
class Evidence:
    """What convicted a worker: enough for anyone to re-run the span and judge the claim."""

    peer: PeerID
    kind: str                 # "equivocation" | "receipt_mismatch" | "spot_check" | ...
    why: str
    receipts: list[bytes] = field(default_factory=list)                 # signed receipt wires
    tensors: dict[str, "torch.Tensor"] = field(default_factory=dict)    # name -> tensor
    detail: dict[str, object] = field(default_factory=dict)             # JSON-able


@dataclass(frozen=True)
class Entry:
    """One blocklisted peer."""

    peer: PeerID
    why: str
    when: float               # unix time of the conviction
    evidence: str | None      # the evidence JSON file (as written; None: none kept)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _utc_stamp(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def write_evidence(folder: Path, ev: Evidence, *, now: float | None = None) -> Path:
    """Write ``ev`` to ``folder`` (created if needed); returns the JSON file's path.

    The tensors (moved to the CPU, made contiguous) go to a ``.safetensors`` file of the
    same stem, named in the JSON (``tensors``; null when there are none)."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{_utc_stamp(time.time() if now is None else now)}-{ev.peer.short()}"
    n = 0
    while (folder / f"{stem}.json").exists() or (folder / f"{stem}.safetensors").exists():
        n += 1
        stem = f"{stem.split('~', 1)[0]}~{n}"
    tensor_name: str | None = None
    if ev.tensors:
        # own storage each: safetensors refuses tensors that share memory (views of one history)
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in ev.tensors.items()}
        tensor_name = f"{stem}.safetensors"
        _atomic_write(folder / tensor_name, save(tensors, metadata={"peer": ev.peer.to_text(), "kind": ev.kind}))
    doc = {
        "peer": ev.peer.to_text(), "kind": ev.kind, "why": ev.why,
        "receipts": [bytes(r).hex() for r in ev.receipts],
        "detail": ev.detail, "tensors": tensor_name,
    }
    path = folder / f"{stem}.json"
    _atomic_write(path, (json.dumps(doc, indent=1, default=str) + "\n").encode("utf-8"))
    return path


def read_evidence(path: Path) -> Evidence:
    """Read an evidence file :func:`write_evidence` wrote (and its tensors); BlocklistError
    for anything missing, oversized or malformed."""
    path = Path(path)
    doc = _read_json(path, MAX_EVIDENCE_JSON_BYTES, "evidence file")
    what = f"evidence file {path}"
    if not isinstance(doc, dict):
        raise BlocklistError(f"{what} is not a JSON object")
    try:
        peer = PeerID.from_text(_text(doc.get("peer"), "peer", what))
    except IdentityError as exc:
        raise BlocklistError(f"{what}: {exc}") from None
    receipts_hex = doc.get("receipts", [])
    if not isinstance(receipts_hex, list):
        raise BlocklistError(f"{what}: 'receipts' must be a list of hex strings")
    try:
        receipts = [bytes.fromhex(_text(r, "receipt", what)) for r in receipts_hex]
    except ValueError:
        raise BlocklistError(f"{what}: a receipt is not hex") from None
    detail = doc.get("detail", {})
    if not isinstance(detail, dict):
        raise BlocklistError(f"{what}: 'detail' must be an object")
    tensors: dict[str, "torch.Tensor"] = {}
    tname = doc.get("tensors")
    if tname is not None:
        tname = _text(tname, "tensors", what)
        tpath = path.parent / Path(tname).name   # only ever beside the JSON file
        try:
            size = tpath.stat().st_size
            if size > MAX_EVIDENCE_TENSOR_BYTES:
                raise BlocklistError(f"{what}: its tensor file {tpath} has {size} bytes (at most "
                                     f"{MAX_EVIDENCE_TENSOR_BYTES})")
            from safetensors.torch import load

            tensors = dict(load(tpath.read_bytes()))
        except OSError as exc:
            raise BlocklistError(f"{what}: its tensor file {tpath} cannot be read: {exc.strerror or exc}") from None
        except BlocklistError:
            raise
        except Exception as exc:  # safetensors raises its own errors for a malformed file
            raise BlocklistError(f"{what}: its tensor file {tpath} is not a safetensors file: {exc}") from None
    return Evidence(peer, _text(doc.get("kind"), "kind", what), _text(doc.get("why"), "why", what),
                    receipts, tensors, {str(k): v for k, v in detail.items()})


def _read_json(path: Path, cap: int, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as exc:
        raise BlocklistError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if len(data) > cap:
        raise BlocklistError(f"{what} {path} is larger than {cap} bytes: not a file pymesh wrote; "
                             "move it away (or pass another path)")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BlocklistError(f"{what} {path} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); "
                             "fix or remove it") from None


def _text(value: object, name: str, what: str) -> str:
    if not isinstance(value, str):
        raise BlocklistError(f"{what}: '{name}' must be a string")
    if len(value) > MAX_TEXT:
        raise BlocklistError(f"{what}: '{name}' is longer than {MAX_TEXT} characters")
    return value


def parse_blocklist(doc: Any, *, source: str = "<blocklist>") -> dict[PeerID, Entry]:
    """The entries of a decoded blocklist document; BlocklistError naming ``source``."""
    what = f"blocklist {source}"
    hint = ("; fix the file by hand or move it away (it lists workers convicted of wrong answers; "
            "pass --blocklist none to run without one)")
    if not isinstance(doc, dict):
        raise BlocklistError(f"{what} is not a JSON object of peer id -> entry{hint}")
    if len(doc) > MAX_ENTRIES:
        raise BlocklistError(f"{what} has {len(doc)} entries (at most {MAX_ENTRIES}){hint}")
    out: dict[PeerID, Entry] = {}
    for key, value in doc.items():
        try:
            peer = PeerID.from_text(key)
        except IdentityError as exc:
            raise BlocklistError(f"{what}: {exc}{hint}") from None
        where = f"{what}, entry {peer.short()}"
        if not isinstance(value, dict):
            raise BlocklistError(f"{where} is not an object {{why, when, evidence}}{hint}")
        why = _text(value.get("why", ""), "why", where)
        when = value.get("when", 0.0)
        try:
            ok = not isinstance(when, bool) and isinstance(when, (int, float)) and math.isfinite(when)
        except OverflowError:  # an int too large for a float
            ok = False
        if not ok:
            raise BlocklistError(f"{where}: 'when' must be a finite number (unix time){hint}")
        evidence = value.get("evidence")
        if evidence is not None:
            evidence = _text(evidence, "evidence", where)
        out[peer] = Entry(peer, why, float(when), evidence)
    return out


class Blocklist:
    """The blocklist file at ``path`` (missing: empty). ``load()`` reads it; ``add`` and
    ``remove`` re-read it and rewrite it atomically under a lock file (``<path>.lock``), so
    entries another client added meanwhile are kept."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries: dict[PeerID, Entry] = {}

    @property
    def evidence_folder(self) -> Path:
        return self.path.parent / EVIDENCE_FOLDER

    def load(self) -> dict[PeerID, Entry]:
        """Read the file (a missing file is an empty list); BlocklistError if malformed."""
        if not self.path.exists():
            self._entries = {}
        else:
            self._entries = parse_blocklist(_read_json(self.path, MAX_BLOCKLIST_BYTES, "blocklist"),
                                            source=str(self.path))
        return dict(self._entries)

    def entries(self) -> dict[PeerID, Entry]:
        """The entries as last loaded or written."""
        return dict(self._entries)

    def __contains__(self, peer: object) -> bool:
        return peer in self._entries

    def add(self, peer: PeerID, why: str, evidence: Path | None = None, *, now: float | None = None) -> Entry:
        """Add (or replace) ``peer``'s entry and rewrite the file."""
        entry = Entry(peer, why[:MAX_TEXT], time.time() if now is None else now,
                      None if evidence is None else str(evidence)[:MAX_TEXT])
        with self._locked():
            self.load()
            self._entries[peer] = entry
            self._write()
        return entry

    def remove(self, peer: PeerID) -> bool:
        """Drop ``peer``'s entry; False when it had none (the file is then left as it was)."""
        with self._locked():
            self.load()
            if self._entries.pop(peer, None) is None:
                return False
            self._write()
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock between the processes that change this blocklist (advisory,
        POSIX ``flock``; where there is none, changes are still atomic, only not serialised)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write(self) -> None:
        doc = {e.peer.to_text(): {"why": e.why, "when": e.when, "evidence": e.evidence}
               for e in sorted(self._entries.values(), key=lambda e: e.when)}
        _atomic_write(self.path, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))


def record_conviction(blocklist: Blocklist | None, peer: PeerID, why: str, evidence: Evidence | None) -> Path | None:
    """Persist a conviction: the evidence to the blocklist's evidence folder, the peer to the
    blocklist. Returns the evidence file (None: no blocklist, no evidence, or writing failed:
    logged, never raised; the conviction in memory stands)."""
    if blocklist is None:
        return None
    path: Path | None = None
    try:
        if evidence is not None:
            path = write_evidence(blocklist.evidence_folder, evidence)
        blocklist.add(peer, why, path)
    except (OSError, BlocklistError, ValueError, TypeError, RuntimeError) as exc:
        log.error("Client: could not record the conviction of %s in %s: %s", peer.short(), blocklist.path, exc)
    return path
