"""``pymesh client``: generate through the swarm, or test an echo chain without a model."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import TYPE_CHECKING

from pymesh.cli.common import (add_swarm_client_arguments, allow_peers_of, blocklist_of, check_device,
                               swarm_client_settings)
from pymesh.settings import settings_of
from pymesh.errors import ConfigError

if TYPE_CHECKING:
    from pymesh.client.swarm import Swarm
    from pymesh.proto.identity import Identity

log = logging.getLogger("pymesh.client")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pymesh.model.sampling import add_sampling_arguments

    parser.add_argument("--bootstrap", action="append", required=True, metavar="ADDR",
                        help="bootstrap node address (HOST:PORT or multiaddr); repeatable")
    parser.add_argument("--model-path", default=None, metavar="DIR",
                        help="model folder (config, tokenizer, embeddings, head); without it: the echo network test")
    parser.add_argument("--model-name", default=None, help="model name in the model id (default: the folder's name; echo: 'echo')")
    parser.add_argument("--prompt", default=None, help="the prompt text")
    parser.add_argument("--chain", default=None, metavar="LIST",
                        help="layers to run, in order: 0,1,2,... or ranges 0-9,10-15 (default: all)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens to generate at most (default 64)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of streaming text")
    parser.add_argument("--hidden-size", type=int, default=4096, help="echo test: hidden size of the test tensor")
    parser.add_argument("--rounds", type=int, default=10, help="echo test: how many times the tensor goes around")
    add_swarm_client_arguments(parser)
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import trio

    from pymesh.model.torch_setup import configure_threads

    configure_threads(settings_of(args).runtime.threads_or(args.threads))
    args.settings = swarm_client_settings(args)   # --verify / --verify-rate / --allow-mixed applied
    if args.model_path is None:
        return trio.run(_network_test, args)
    if not args.prompt:
        raise ConfigError("--prompt is required with --model-path")
    return trio.run(_generate, args)


def _identity(args: argparse.Namespace) -> "Identity | None":
    from pymesh.proto.identity import Identity

    return None if args.identity is None else Identity.load_or_create(args.identity)


def _range(args: argparse.Namespace, num_layers: int | None) -> tuple[int, int] | None:
    from pymesh.client.routing import parse_chain

    if args.chain is None:
        return (0, num_layers) if num_layers is not None else None
    try:
        return parse_chain(args.chain, num_layers)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


async def _generate(args: argparse.Namespace) -> int:
    from pymesh.client.generation import ClientModel, GenerationStats, generate_tokens
    from pymesh.client.swarm import Swarm
    from pymesh.model.sampling import sampling_params_from_args

    params = sampling_params_from_args(args)
    check_device(args.device)
    model = ClientModel(args.model_path, device=args.device, dtype=args.dtype, model_name=args.model_name,
                        quantize=args.quantize)
    layers = _range(args, model.config.num_hidden_layers)
    if layers != (0, model.config.num_hidden_layers):
        raise ConfigError(f"--chain must cover every layer 0-{model.config.num_hidden_layers - 1} to generate "
                          "text (a partial chain only makes sense for the echo network test)")
    from pymesh.model.sampling import StopText

    ids = model.prompt_ids(args.prompt, args.chat)
    stats = GenerationStats()
    decoder = model.tokenizer.stream_decoder()
    stop_text = StopText(params.stop)  # like `pymesh generate`: the stop text itself is never shown
    async with Swarm(args.bootstrap, model.model_id, transport=args.transport,
                     settings=settings_of(args), allow_peers=allow_peers_of(args),
                     identity=_identity(args), blocklist=blocklist_of(args)) as swarm:
        def rewind(keep: int) -> None:
            """Verification convicted a worker after its output was used: the text from token
            ``keep`` on is recomputed; say so and print the text again from the start."""
            nonlocal decoder, stop_text
            sys.stderr.write(f"\n[pymesh: a worker was convicted of wrong outputs; the text from token {keep} on "
                             "is recomputed on an honest route]\n")
            if args.json:
                return
            decoder, stop_text = model.tokenizer.stream_decoder(), StopText(params.stop)
            sys.stdout.write("\n" + "".join(stop_text.push(decoder.push(t)) for t in stats.tokens[:keep]))

        async for token in generate_tokens(swarm, model, ids, params, stats=stats, rewind=rewind):
            if not args.json:
                sys.stdout.write(stop_text.push(decoder.push(token)))
                sys.stdout.flush()
    text = model.tokenizer.decode(stats.tokens)
    for s in params.stop:
        if s in text:
            text = text[: text.index(s)]
    if args.json:
        json.dump({"tokens": stats.tokens, "text": text, "prompt_tokens": stats.prompt_tokens,
                   "prefill_s": round(stats.prefill_s, 4),
                   "decode_tokens_per_s": round(stats.decode_tokens_per_s, 3),
                   "route": stats.route, "recoveries": stats.recoveries,
                   **_verification_json(stats, swarm)}, sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(stop_text.push(decoder.flush()) + stop_text.flush() + "\n")
    return 0


def _verification_json(stats: object, swarm: "Swarm") -> dict[str, object]:
    """``--json``'s verification fields: the session's report (checks, mismatches, ...) when
    the generation kept one, and the workers this run convicted."""
    out: dict[str, object] = {}
    report = getattr(stats, "verification", None)
    if report is not None and callable(getattr(report, "to_json", None)):
        out["verification"] = report.to_json()
    out["convicted"] = {p.to_text(): why for p, why in swarm.convicted.items()}
    return out


async def _network_test(args: argparse.Namespace) -> int:
    from pymesh.client.nettest import run_network_test
    from pymesh.client.swarm import Swarm

    layers = _range(args, None)
    if layers is None:
        raise ConfigError("the echo network test needs --chain (which layers the echo workers serve), "
                          "or --model-path to generate")
    t0 = time.perf_counter()
    async with Swarm(args.bootstrap, args.model_name or "echo", transport=args.transport,
                     settings=settings_of(args), allow_peers=allow_peers_of(args),
                     identity=_identity(args), blocklist=blocklist_of(args)) as swarm:
        res = await run_network_test(swarm, layers[0], layers[1], hidden=args.hidden_size, rounds=args.rounds)
    if args.json:
        json.dump({"route": res.route, "hop_ms": [round(h, 3) for h in res.hop_ms],
                   "round_trip_ms": round(res.round_trip_ms, 3), "megabytes_per_s": round(res.megabytes_per_s, 3),
                   "rounds": res.rounds, "tensor_shape": list(res.tensor_shape),
                   "elapsed_s": round(time.perf_counter() - t0, 3)}, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"echo chain over {len(res.route)} hop(s), tensor {list(res.tensor_shape)} float32, {res.rounds} rounds")
    prev = 0.0
    for hop, ms in zip(res.route, res.hop_ms):
        print(f"  {hop['peer'][:10]} layers {hop['start']}-{hop['stop'] - 1}: +{ms - prev:.2f} ms (cumulative {ms:.2f} ms)")
        prev = ms
    print(f"round trip {res.round_trip_ms:.2f} ms, throughput {res.megabytes_per_s:.1f} MB/s")
    return 0
