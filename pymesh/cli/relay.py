"""``pymesh relay --port N --bootstrap ADDR``: relay for workers and clients behind NAT.

A relay carries end-to-end encrypted circuits (it sees ciphertext only) within quotas set
here, and lets peers learn their NAT mapping for hole punching. It needs a public address:
run it where its port N (UDP and TCP) and N+1 (UDP) can be reached.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from pymesh.errors import ConfigError

if TYPE_CHECKING:
    from pymesh.net.relay import RelayLimits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", action="append", required=True, metavar="ADDR",
                        help="bootstrap node address (HOST:PORT or /ip4/HOST/udp/PORT); repeatable")
    parser.add_argument("--port", type=int, default=9100,
                        help="QUIC on UDP N and circuits on TCP N; the DHT takes UDP N+1 (default 9100)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--announce-addr", default=None, metavar="HOST",
                        help="public address published in the relay record (default: --host, or what DHT peers see)")
    parser.add_argument("--identity", default=None, metavar="FILE",
                        help="identity key file (default ~/.pymesh/relay-PORT.key)")
    add_limit_arguments(parser)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--relay-bandwidth", type=float, default=256.0, metavar="MB/S",
                        help="bytes per second all circuits together may carry, in MB/s (default 256)")
    parser.add_argument("--relay-peer-bandwidth", type=float, default=64.0, metavar="MB/S",
                        help="MB/s the circuits of one reserved peer may carry (default 64)")
    parser.add_argument("--relay-max-circuits", type=int, default=256,
                        help="circuits carried at once (default 256)")
    parser.add_argument("--relay-max-reservations", type=int, default=128,
                        help="peers holding a reservation at once (default 128)")
    parser.add_argument("--relay-circuits-per-peer", type=int, default=16,
                        help="circuits to one reserved peer, and from one dialing address (default 16)")


def limits_of(args: argparse.Namespace) -> "RelayLimits":
    from pymesh.net.relay import RelayLimits

    for name in ("relay_bandwidth", "relay_peer_bandwidth", "relay_max_circuits", "relay_max_reservations",
                 "relay_circuits_per_peer"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    return RelayLimits(max_reservations=args.relay_max_reservations, max_circuits=args.relay_max_circuits,
                       max_circuits_per_peer=args.relay_circuits_per_peer,
                       max_circuits_per_ip=args.relay_circuits_per_peer,
                       bandwidth=args.relay_bandwidth * 1e6, peer_bandwidth=args.relay_peer_bandwidth * 1e6)


def run(args: argparse.Namespace) -> int:
    import trio

    from pymesh.settings import settings_of
    from pymesh.worker.relay_node import RelayOptions, run_relay

    opts = RelayOptions(bootstrap=args.bootstrap, port=args.port, host=args.host, announce_addr=args.announce_addr,
                        identity=args.identity, limits=limits_of(args), settings=settings_of(args))
    trio.run(run_relay, opts)
    return 0
