"""A libtorrent DHT peer driven over stdin/stdout (JSON lines), for interop tests.

    python lt_peer.py PORT [BOOTSTRAP_HOST:PORT]

Commands (one JSON object per line; one JSON reply line each):
    {"cmd": "get_mutable", "key": hex, "salt": hex, "timeout": s}  -> {"value": hex|None, "seq": n}
    {"cmd": "announce", "ih": hex, "port": n}                      -> {"ok": true}
    {"cmd": "get_peers", "ih": hex, "timeout": s}                  -> {"peers": [[host, port], ...]}
    {"cmd": "node_id"}                                             -> {"id": hex|None}
    {"cmd": "quit"}
Every wait is bounded by its timeout; alerts are polled.
"""

from __future__ import annotations

import json
import sys
import time

import libtorrent as lt


def make_session(port: int, bootstrap: str) -> "lt.session":
    settings = {
        "listen_interfaces": f"127.0.0.1:{port}",
        "enable_dht": True,
        "dht_bootstrap_nodes": bootstrap,
        "dht_block_ratelimit": 100000,
        "dht_restrict_routing_ips": False,
        "dht_restrict_search_ips": False,
        "dht_ignore_dark_internet": False,
        "dht_prefer_verified_node_ids": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "alert_mask": lt.alert.category_t.all_categories,
    }
    ses = lt.session(settings)
    if bootstrap:
        host, _, p = bootstrap.rpartition(":")
        ses.add_dht_node((host, int(p)))
    return ses


def wait_for(ses: "lt.session", kind: type, timeout: float, pred=lambda a: True):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ses.wait_for_alert(200)
        for a in ses.pop_alerts():
            if isinstance(a, kind) and pred(a):
                return a
    return None


def main() -> None:
    port = int(sys.argv[1])
    bootstrap = sys.argv[2] if len(sys.argv) > 2 else ""
    ses = make_session(port, bootstrap)
    # Ready once the DHT runs and the UDP socket listens (bounded wait).
    end = time.monotonic() + 20
    listening = False
    while time.monotonic() < end and not (listening and ses.is_dht_running()):
        ses.wait_for_alert(100)
        for a in ses.pop_alerts():
            if isinstance(a, lt.listen_succeeded_alert):
                listening = True
    print(json.dumps({"ready": bool(listening and ses.is_dht_running())}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        out: dict = {}
        if cmd == "quit":
            break
        if cmd == "get_mutable":
            key, salt = bytes.fromhex(req["key"]), bytes.fromhex(req.get("salt", ""))
            end = time.monotonic() + req.get("timeout", 10)
            out = {"value": None, "seq": None}
            while time.monotonic() < end and out["value"] is None:
                ses.dht_get_mutable_item(key, salt)
                a = wait_for(ses, lt.dht_mutable_item_alert, min(3.0, end - time.monotonic()),
                             lambda a: bytes(a.key) == key)
                if a is not None and a.seq > 0 or (a is not None and a.item):
                    out = {"value": lt.bencode(a.item).hex(), "seq": a.seq}
        elif cmd == "announce":
            ses.dht_announce(lt.sha1_hash(bytes.fromhex(req["ih"])), req["port"], 0)
            out = {"ok": True}
        elif cmd == "get_peers":
            ih = bytes.fromhex(req["ih"])
            end = time.monotonic() + req.get("timeout", 10)
            peers: set = set()
            while time.monotonic() < end and not peers:
                ses.dht_get_peers(lt.sha1_hash(ih))
                a = wait_for(ses, lt.dht_get_peers_reply_alert, min(3.0, end - time.monotonic()),
                             lambda a: bytes(a.info_hash.to_bytes()) == ih)
                if a is not None:
                    peers |= {(str(h), int(p)) for h, p in a.peers()}
            out = {"peers": sorted(peers)}
        elif cmd == "node_id":
            state = ses.dht_state() if hasattr(ses, "dht_state") else None
            out = {"state": repr(state)[:200]}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
