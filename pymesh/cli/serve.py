"""``pymesh serve``: an OpenAI-compatible HTTP API in front of the swarm (docs/API.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pymesh.cli.common import (add_swarm_client_arguments, allow_peers_of, blocklist_of, check_device,
                               swarm_client_settings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pymesh.model.sampling import add_sampling_arguments

    parser.add_argument("--bootstrap", action="append", required=True, metavar="ADDR",
                        help="bootstrap node address (HOST:PORT or multiaddr); repeatable")
    parser.add_argument("--model-path", required=True, metavar="DIR",
                        help="model folder (config, tokenizer, embeddings, head)")
    parser.add_argument("--model-name", default=None, help="model name in the model id (default: the folder's name)")
    parser.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT",
                        help="HTTP address of the API (default 127.0.0.1:8000; --port stays a node's transport port)")
    parser.add_argument("--api-key-file", default=None, metavar="FILE",
                        help="require this key (first line of FILE) as 'Authorization: Bearer KEY'; or set "
                             "PYMESH_API_KEY (never a key on the command line, where ps shows it)")
    parser.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request (default 256)")
    parser.add_argument("--max-active", type=int, default=16,
                        help="generations running at once (default 16: workers and the client batch the steps of "
                             "concurrent sessions, so they share the cost of reading the weights)")
    parser.add_argument("--max-waiting", type=int, default=32,
                        help="requests waiting for a slot before new ones get 429 (default 32)")
    add_swarm_client_arguments(parser)
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pymesh.api.server import ServeOptions, read_api_key, serve_until_signal
    from pymesh.errors import ConfigError
    from pymesh.model.sampling import sampling_params_from_args
    from pymesh.model.torch_setup import configure_threads
    from pymesh.proto.identity import Identity

    import logging

    if not getattr(args, "verbose", 0):
        # the client logs every step at INFO; a server's log would be nothing else (-v brings them back)
        logging.getLogger("pymesh.client").setLevel(logging.WARNING)
    settings = swarm_client_settings(args)   # --verify / --verify-rate applied
    configure_threads(settings.runtime.threads_or(args.threads))
    check_device(args.device)
    if args.max_active < 1 or args.max_waiting < 0:
        raise ConfigError("--max-active must be at least 1 and --max-waiting at least 0")
    options = ServeOptions(
        bootstrap=list(args.bootstrap), model_path=Path(args.model_path), listen=args.listen,
        model_name=args.model_name, quantize=args.quantize, transport=args.transport, device=args.device, dtype=args.dtype,
        api_key=read_api_key(args.api_key_file, settings.api_key), max_active=args.max_active,
        max_waiting=args.max_waiting, settings=settings, allow_peers=allow_peers_of(args),
        identity=None if args.identity is None else Identity.load_or_create(args.identity),
        blocklist=blocklist_of(args))

    def started(urls: list[str]) -> None:
        print(f"pymesh serve: OpenAI-compatible API at {urls[0]}/v1", flush=True)

    serve_until_signal(options, sampling_params_from_args(args), started)
    return 0
