"""``pymesh worker``: serve a span of transformer blocks to the swarm."""

from __future__ import annotations

import argparse
from typing import Any

from pymesh.cli.common import add_allow_peers_argument, add_quantize_argument, allow_peers_of, check_device, with_flags
from pymesh.settings import settings_of
from pymesh.errors import ConfigError
from pymesh.proto.reach import REACHABILITY
from pymesh.proto.vocab import Transport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", action="append", required=True, metavar="ADDR",
                        help="bootstrap node address (HOST:PORT or /ip4/HOST/udp/PORT); repeatable")
    parser.add_argument("--layers", default=None, metavar="A-B",
                        help="blocks to serve, inclusive (e.g. 0-7); default: as many as fit, where the swarm needs them")
    parser.add_argument("--model-path", default=None, metavar="DIR",
                        help="Hugging Face model folder; without it: echo mode (hidden states returned unchanged)")
    parser.add_argument("--model-name", default=None, help="model name in the model id (default: the folder's name; echo mode: 'echo')")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_quantize_argument(parser, "compute the blocks' weight matrices")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=0, help="transport port: QUIC on UDP N, TCP on TCP N (default: any)")
    parser.add_argument("--dht-port", type=int, default=None, help="DHT UDP port (default: --port + 1)")
    parser.add_argument("--announce-addr", default=None, metavar="HOST",
                        help="address published in the worker's record (default: --host; for 0.0.0.0 the address DHT "
                             "peers see, or 127.0.0.1 in a swarm on this machine)")
    parser.add_argument("--transport", default=Transport.QUIC.value, choices=[*(t.value for t in Transport), "both"])
    parser.add_argument("--reachability", default="auto", choices=REACHABILITY,
                        help="auto: ask DHT nodes for a dial-back to learn whether this worker is reachable or "
                             "behind NAT (then reached via relays, hole punching where the NAT allows); "
                             "public / nat: skip the check (default auto; --announce-addr implies public)")
    parser.add_argument("--relay", action="store_true",
                        help="also relay for peers behind NAT (circuits on TCP --port; quotas below)")
    from pymesh.cli.relay import add_limit_arguments

    add_limit_arguments(parser)
    parser.add_argument("--cache-tokens", type=int, default=8192,
                        help="KV-cache budget in tokens, summed over sessions (default 8192)")
    parser.add_argument("--identity", default=None, metavar="FILE",
                        help="identity key file (default ~/.pymesh/worker-PORT.key, created on first start; a fresh key when --port is 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: $PYMESH_THREADS or half the cores)")
    parser.add_argument("--no-batching", action="store_true",
                        help="compute each session's step on its own instead of batching the steps of sessions "
                             "that are ready together (also $PYMESH_BATCHING=0)")
    parser.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                        help="rows (decode tokens plus prefill chunk) one batched forward takes at most; longer "
                             "prompts are cut into chunks while other sessions decode (default 256, "
                             "$PYMESH_BATCH_TOKENS)")
    parser.add_argument("--max-blocks", type=int, default=None,
                        help="without --layers: serve at most this many blocks (also $PYMESH_MAX_BLOCKS)")
    parser.add_argument("--num-layers", type=int, default=None,
                        help="echo mode without --layers: how many layers the echoed model has")
    add_allow_peers_argument(parser, "serve only listed clients and push only to listed workers")
    parser.add_argument("--metrics-listen", default=None, metavar="[HOST:]PORT",
                        help="serve Prometheus metrics (steps, cache use, compute time, refusals) at this "
                             "address; a bare PORT binds 127.0.0.1")


def parse_layers(text: str) -> tuple[int, int]:
    """``A-B`` (inclusive) or ``A`` -> half-open ``(A, B+1)``."""
    a, sep, b = text.strip().partition("-")
    if not a.isdigit() or (sep and not b.isdigit()):
        raise ConfigError(f"--layers {text!r}: expected A-B with layer numbers, e.g. 0-7")
    lo, hi = int(a), int(b) if sep else int(a)
    if hi < lo:
        raise ConfigError(f"--layers {text!r}: the range runs backwards")
    return lo, hi + 1


def run(args: argparse.Namespace) -> int:
    import trio

    from pymesh.model.torch_setup import configure_threads
    from pymesh.cli.relay import limits_of
    from pymesh.worker.server import WorkerOptions, run_worker

    if args.port and not 0 < args.port < 65535:
        raise ConfigError(f"--port {args.port} must be in 1..65534 (the DHT takes port + 1)")
    if args.cache_tokens <= 0:
        raise ConfigError(f"--cache-tokens {args.cache_tokens}: the KV-cache budget must be a positive "
                          "number of tokens (e.g. 8192)")
    if args.max_blocks is not None and args.max_blocks <= 0:
        raise ConfigError(f"--max-blocks {args.max_blocks} must be at least 1")
    check_device(args.device)
    layers = parse_layers(args.layers) if args.layers else None
    if args.model_path is None and layers is None and args.num_layers is None:
        raise ConfigError("echo mode (no --model-path) needs --layers A-B (or --num-layers N to place itself)")
    if args.batch_tokens is not None and args.batch_tokens <= 0:
        raise ConfigError(f"--batch-tokens {args.batch_tokens} must be at least 1")
    settings = with_flags(settings_of(args), threads=args.threads, max_blocks=args.max_blocks,
                          batching=False if args.no_batching else None, batch_tokens=args.batch_tokens)
    threads = configure_threads(settings.runtime.threads)
    opts = WorkerOptions(
        bootstrap=args.bootstrap, layers=layers, model_path=args.model_path, model_name=args.model_name,
        quantize=args.quantize,
        device=args.device, dtype=args.dtype, host=args.host, port=args.port, dht_port=args.dht_port,
        announce_addr=args.announce_addr, transport=args.transport, cache_tokens=args.cache_tokens,
        identity=args.identity, threads=threads, max_blocks=args.max_blocks,
        num_layers=args.num_layers, progress=not args.quiet, settings=settings,
        allow_peers=allow_peers_of(args), reachability=args.reachability, relay=args.relay,
        relay_limits=limits_of(args),
    )
    try:
        trio.run(run_worker, opts, _metrics_hook(args.metrics_listen))
    except BaseExceptionGroup as group:
        # Errors raised inside the worker's nurseries arrive wrapped; report the one that matters.
        from pymesh.errors import PymeshError

        found = group.subgroup(lambda e: isinstance(e, PymeshError))
        while found is not None and isinstance(found, BaseExceptionGroup) and len(found.exceptions) == 1:
            found = found.exceptions[0]
        if isinstance(found, PymeshError):
            raise found from None
        raise
    return 0


def _metrics_hook(addr: str | None) -> Any:
    if addr is None:
        return None
    from pymesh.worker.metrics import parse_listen, start_metrics

    parse_listen(addr)  # a bad address fails before the worker starts
    return lambda worker: start_metrics(addr, worker)
