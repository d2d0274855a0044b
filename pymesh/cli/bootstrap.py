"""``pymesh bootstrap --port 9000 [--host 0.0.0.0] [--identity FILE] [--announce-addr HOST]``.

Runs a DHT node that workers and clients use as a rendezvous. Prints its peer ID and
the address to pass as ``--bootstrap`` (``HOST:PORT`` and the multiaddr form), then
serves until Ctrl-C or SIGTERM. Imports nothing of the model stack (no torch).
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=9000, help="UDP port of the DHT (default 9000)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--identity", default=None,
                        help="Ed25519 key file (created if missing; default ~/.pymesh/bootstrap.key)")
    parser.add_argument("--announce-addr", default=None,
                        help="address others should use to reach this node (default: a local address)")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="ADDR",
                        help="other bootstrap node(s) to join, HOST:PORT or multiaddr (repeatable)")


def _local_ip() -> str:
    """The address this host would use towards the outside (no packet is sent)."""
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))
        return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


def run(args: argparse.Namespace) -> int:
    import signal

    import trio

    from pymesh.settings import settings_of
    from pymesh.errors import ConfigError
    from pymesh.net.dht import DHTNode
    from pymesh.proto.addr import PeerAddr, parse_addr
    from pymesh.proto.identity import Identity, default_identity_path

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not in 1..65535")
    settings = settings_of(args)
    identity = Identity.load_or_create(args.identity or default_identity_path("bootstrap", settings.runtime.home))
    peers = [parse_addr(a) for a in args.bootstrap]

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with DHTNode(identity, host=args.host, port=args.port, bootstrap=peers,
                               config=settings.dht_config()) as node:
                host = args.announce_addr or (args.host if args.host not in ("0.0.0.0", "") else _local_ip())
                addr = PeerAddr(host, node.port, "udp", identity.peer_id)
                print(f"peer id: {identity.peer_id}", flush=True)
                print(f"bootstrap address: {addr.hostport()}", flush=True)
                print(f"bootstrap multiaddr: {addr.to_multiaddr()}", flush=True)
                if settings.report_modules:
                    print(f"torch imported: {'torch' in sys.modules}", flush=True)
                log.info("bootstrap node %s serving on udp %s:%d", identity.peer_id.short(), args.host, node.port)
                async for signum in signals:
                    log.info("received %s; shutting down", signal.Signals(signum).name)
                    break

    trio.run(main)
    return 0
