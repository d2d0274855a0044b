"""Checking BEP 44 ``get`` replies: which stored item a lookup's answers prove.

A mutable item counts only when its public key (with the salt the caller asked for) hashes
to the target and its signature over (salt, seq, value) verifies; an immutable one only when
the value hashes to the target. Among the items that check out the highest ``seq`` wins; an
immutable item is taken only when nothing else was found. No I/O, no clock.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from pymesh.proto.bencode import encode
from pymesh.proto.identity import verify_signature
from pymesh.proto.krpc import mutable_sign_input
from pymesh.proto.storage import immutable_target, mutable_target

#: An item as a get returns it: (value, seq), seq None for an immutable item.
Item = tuple[object, int | None]


def verified_item_untrusted(values: Mapping[bytes, object], target: bytes, salt: bytes = b"") -> Item | None:
    """The item one reply's ``r`` dict carries for ``target``, or None when it has none or
    it does not check out."""
    if b"v" not in values:
        return None
    value = values[b"v"]
    v_raw = encode(value)
    k, sig, seq = values.get(b"k"), values.get(b"sig"), values.get(b"seq")
    if isinstance(k, bytes) and isinstance(sig, bytes) and isinstance(seq, int):
        if mutable_target(k, salt) != target:
            return None
        if not verify_signature(k, sig, mutable_sign_input(v_raw, seq, salt)):
            return None
        return (value, seq)
    if immutable_target(v_raw) == target:
        return (value, None)
    return None


def best_item_untrusted(replies: Iterable[Mapping[bytes, object]], target: bytes, salt: bytes = b"",
                        local: Item | None = None) -> Item | None:
    """The item with the highest verified seq among ``local`` (this node's own copy, already
    trusted) and the replies; an immutable item only when there is nothing else."""
    best = local
    for values in replies:
        item = verified_item_untrusted(values, target, salt)
        if item is None:
            continue
        if item[1] is not None:
            if best is None or (best[1] if best[1] is not None else -1) < item[1]:
                best = item
        elif best is None:
            best = item
    return best
