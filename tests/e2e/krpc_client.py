"""A raw KRPC speaker for hostile DHT tests: one UDP socket, one query at a time.

It plays an independent peer that follows the wire format but not the rules: it fetches
write tokens with ``pm_get`` and stores whatever records it likes with ``pm_put``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from pymesh.proto import krpc
from pymesh.proto.bencode import decode_untrusted


class RawKRPC:
    def __init__(self, host: str, port: int, *, timeout: float = 2.0) -> None:
        self.addr = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(timeout)
        self.node_id = os.urandom(20)
        self._n = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawKRPC":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def query(self, method: bytes, args: dict[bytes, object]) -> Any:
        """Send one query; returns the decoded Response or ErrorReply (None on timeout)."""
        self._n += 1
        tid = self._n.to_bytes(4, "big")
        self.sock.sendto(krpc.encode_query(tid, method, {b"id": self.node_id, **args}), self.addr)
        for _ in range(20):  # skip stale replies to earlier (timed-out) queries
            try:
                data, _ = self.sock.recvfrom(65536)
            except (socket.timeout, TimeoutError):
                return None
            msg = krpc.decode_message_untrusted(data)
            if msg.tid == tid:
                return msg
        return None

    def pm_get(self, target: bytes, block: int | None = None, token: bytes | None = None) -> Any:
        args: dict[bytes, object] = {b"target": target}
        if block is not None:
            args[b"b"] = block
        if token is not None:  # proves this address receives: the full page, not a capped one
            args[b"token"] = token
        return self.query(b"pm_get", args)

    def pm_put(self, target: bytes, raw: bytes, token: bytes | None = None) -> Any:
        if token is None:
            got = self.pm_get(target)
            assert got is not None and isinstance(got, krpc.Response), f"pm_get failed: {got}"
            token = got.values[b"token"]
        return self.query(b"pm_put", {b"target": target, b"rec": raw, b"token": token})

    def records(self, target: bytes) -> list[bytes]:
        first = self.pm_get(target)
        assert isinstance(first, krpc.Response), f"pm_get failed: {first}"
        got = self.pm_get(target, token=first.values[b"token"])
        assert isinstance(got, krpc.Response), f"pm_get failed: {got}"
        return list(got.values.get(b"recs", []))


def record_fields(raw: bytes) -> dict[bytes, Any]:
    d = decode_untrusted(raw)
    assert isinstance(d, dict)
    return d
