"""Tiny UDP/TCP probes run inside test namespaces (`python udp_tool.py MODE ...`). Every socket
operation has a timeout and every loop a deadline. Output: JSON lines on stdout.

Modes:
  serve --udp PORT --tcp PORT --seconds S
      Print {"ready": true} once bound. Answer each UDP datagram with the sender's "ip:port" and
      each TCP connection with "ip:port\\n"; print {"udp": "ip:port", "data": ...} or
      {"tcp": "ip:port"} for each. Exit after S seconds (or when killed).
  query --bind PORT --to IP:PORT [--to IP:PORT ...] [--tcp]
      From one socket bound to PORT, ask each server for the address it sees; print
      {"seen": {"IP:PORT": "ip:port" | null}}.
  poke --to IP:PORT [--to ...] [--bind PORT] [--count N]
      Send N UDP datagrams to each target and try a TCP connect to each (1 s timeout); print
      {"tcp": {"IP:PORT": "connected" | "<error>"}}.
  punch --bind PORT --observer IP:PORT --seconds S
      Learn this socket's external address from the observer and print {"mapped": "ip:port"};
      read the peer's "ip:port" from stdin; send "punch" to it every 50 ms for S seconds,
      recording every datagram that arrives; print {"mapped": ..., "received": [["ip:port",
      data], ...] (first 50), "punched_from": ["ip:port" that sent "punch"], "sent": n}.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import time

REPLY_TIMEOUT = 1.0


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _fmt(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def _emit(obj: object) -> None:
    print(json.dumps(obj), flush=True)


def serve(udp_port: int, tcp_port: int, seconds: float) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", udp_port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", tcp_port))
    tcp.listen(16)
    _emit({"ready": True})
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([udp, tcp], [], [], min(left, 0.5))
        if udp in readable:
            data, src = udp.recvfrom(2048)
            udp.sendto(_fmt(src).encode(), src)
            _emit({"udp": _fmt(src), "data": data.decode(errors="replace")})
        if tcp in readable:
            conn, src = tcp.accept()
            with conn:
                conn.settimeout(REPLY_TIMEOUT)
                conn.sendall((_fmt(src) + "\n").encode())
            _emit({"tcp": _fmt(src)})


def _ask_udp(sock: socket.socket, server: tuple[str, int]) -> str | None:
    for _ in range(3):  # the first datagram may be lost while ARP resolves
        sock.sendto(b"?", server)
        deadline = time.monotonic() + REPLY_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, src = sock.recvfrom(2048)
            except (socket.timeout, ConnectionRefusedError):
                break
            if src == server:
                return data.decode()
    return None


def _ask_tcp(bind: int, server: tuple[str, int]) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", bind))
        sock.settimeout(3 * REPLY_TIMEOUT)
        try:
            sock.connect(server)
            return sock.recv(256).decode().strip() or None
        except OSError:
            return None


def query(bind: int, targets: list[str], tcp: bool) -> None:
    seen: dict[str, str | None] = {}
    if tcp:
        for t in targets:
            seen[t] = _ask_tcp(bind, _addr(t))
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("0.0.0.0", bind))
            for t in targets:
                seen[t] = _ask_udp(sock, _addr(t))
    _emit({"seen": seen})


def poke(targets: list[str], bind: int, count: int) -> None:
    results: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("0.0.0.0", bind))
        for t in targets:
            for i in range(count):
                try:
                    udp.sendto(f"unsolicited {i}".encode(), _addr(t))
                except OSError as e:  # e.g. "Network is unreachable" for a private address
                    results[t + "/udp"] = str(e)
                time.sleep(0.02)
    for t in targets:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(REPLY_TIMEOUT)
            try:
                sock.connect(_addr(t))
                results[t] = "connected"
            except OSError as e:
                results[t] = str(e) or type(e).__name__
    _emit({"tcp": results})


def punch(bind: int, observer: str, seconds: float) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", bind))
        mapped = _ask_udp(sock, _addr(observer))
        _emit({"mapped": mapped})
        ready, _, _ = select.select([sys.stdin], [], [], 10.0)
        if not ready:
            _emit({"error": "no peer address on stdin within 10 s"})
            return
        peer = _addr(sys.stdin.readline().strip())
        received: list[list[str]] = []
        punched_from: list[str] = []
        sent = 0
        deadline = time.monotonic() + seconds
        next_send = 0.0
        while (now := time.monotonic()) < deadline:
            if now >= next_send:
                sock.sendto(b"punch", peer)
                sent += 1
                next_send = now + 0.05
            sock.settimeout(max(0.001, min(next_send, deadline) - time.monotonic()))
            try:
                data, src = sock.recvfrom(2048)
            except (socket.timeout, ConnectionRefusedError):
                continue
            if len(received) < 50:
                received.append([_fmt(src), data.decode(errors="replace")])
            if data == b"punch" and _fmt(src) not in punched_from:
                punched_from.append(_fmt(src))
        _emit({"mapped": mapped, "received": received, "punched_from": punched_from, "sent": sent})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--udp", type=int, required=True)
    s.add_argument("--tcp", type=int, required=True)
    s.add_argument("--seconds", type=float, default=20.0)
    q = sub.add_parser("query")
    q.add_argument("--bind", type=int, default=0)
    q.add_argument("--to", action="append", required=True)
    q.add_argument("--tcp", action="store_true")
    p = sub.add_parser("poke")
    p.add_argument("--to", action="append", required=True)
    p.add_argument("--bind", type=int, default=0)
    p.add_argument("--count", type=int, default=3)
    h = sub.add_parser("punch")
    h.add_argument("--bind", type=int, required=True)
    h.add_argument("--observer", required=True)
    h.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args(argv)
    if a.mode == "serve":
        serve(a.udp, a.tcp, a.seconds)
    elif a.mode == "query":
        query(a.bind, a.to, a.tcp)
    elif a.mode == "poke":
        poke(a.to, a.bind, a.count)
    else:
        punch(a.bind, a.observer, a.seconds)


if __name__ == "__main__":
    main()
