"""The pure parts the DHT node's I/O glue uses: BEP 44 reply checks and bootstrap back-off."""

from __future__ import annotations

from pymesh.proto.backoff import MAX_BACKOFF, Backoff
from pymesh.proto.bencode import encode
from pymesh.proto.bep44 import best_item_untrusted, verified_item_untrusted
from pymesh.proto.identity import Identity
from pymesh.proto.krpc import mutable_sign_input
from pymesh.proto.storage import immutable_target, mutable_target


def _mutable(ident: Identity, value: object, seq: int, salt: bytes = b"") -> dict[bytes, object]:
    sig = ident.sign(mutable_sign_input(encode(value), seq, salt))
    return {b"v": value, b"k": ident.public_key, b"sig": sig, b"seq": seq}


def test_mutable_reply_must_match_target_and_signature() -> None:
    ident = Identity.generate()
    target = mutable_target(ident.public_key, b"s")
    good = _mutable(ident, b"hello", 3, b"s")
    assert verified_item_untrusted(good, target, b"s") == (b"hello", 3)
    assert verified_item_untrusted(good, target, b"") is None                 # wrong salt
    assert verified_item_untrusted({**good, b"v": b"forged"}, target, b"s") is None
    assert verified_item_untrusted({**good, b"seq": 4}, target, b"s") is None
    other = Identity.generate()
    assert verified_item_untrusted(_mutable(other, b"hello", 3, b"s"), target, b"s") is None
    assert verified_item_untrusted({b"nodes": b""}, target) is None


def test_immutable_reply_must_hash_to_target() -> None:
    target = immutable_target(encode(b"blob"))
    assert verified_item_untrusted({b"v": b"blob"}, target) == (b"blob", None)
    assert verified_item_untrusted({b"v": b"blub"}, target) is None


def test_best_item_takes_highest_verified_seq() -> None:
    ident = Identity.generate()
    target = mutable_target(ident.public_key)
    forged: dict[bytes, object] = {**_mutable(ident, b"v9", 9), b"v": b"evil"}
    replies: list[dict[bytes, object]] = [_mutable(ident, b"v2", 2), forged, _mutable(ident, b"v5", 5), {b"token": b"t"}]
    assert best_item_untrusted(replies, target) == (b"v5", 5)
    assert best_item_untrusted(replies, target, local=(b"mine", 7)) == (b"mine", 7)
    assert best_item_untrusted([], target) is None
    assert best_item_untrusted([forged], target, local=(b"mine", None)) == (b"mine", None)


def test_immutable_item_only_when_nothing_else() -> None:
    target = immutable_target(encode(b"x"))
    assert best_item_untrusted([{b"v": b"x"}, {b"v": b"x"}], target) == (b"x", None)
    assert best_item_untrusted([{b"v": b"x"}], target, local=(b"kept", None)) == (b"kept", None)


def test_backoff_doubles_to_a_cap_and_resets() -> None:
    b: Backoff[str] = Backoff()
    assert b.due("a", 0.0) and b.wait("a") is None
    assert b.failed("a", 0.0, period=1.0) == 1.0
    assert not b.due("a", 0.5) and b.due("a", 1.0)
    waits = [b.failed("a", 10.0, period=1.0) for _ in range(5)]
    assert waits == [2.0, 4.0, 8.0, 8.0, 8.0]            # capped at 8 x period
    assert not b.due("a", 17.9) and b.due("a", 18.0)
    assert b.due("b", 10.0)                               # per key
    b.succeeded("a")
    assert b.due("a", 10.0) and "a" not in b
    for _ in range(10):
        wait = b.failed("c", 0.0, period=100.0)
    assert wait == MAX_BACKOFF
