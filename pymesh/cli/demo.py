"""``pymesh demo [--interactive] [--workers 3] [--prompt ...]``: a local swarm answering chat prompts."""

from __future__ import annotations

import argparse

from pymesh.cli.common import add_allow_peers_argument, allow_peers_of
from pymesh.proto.vocab import Transport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=3, help="worker processes to start (default 3)")
    parser.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                        help="a chat prompt to answer (repeatable; default: three short questions)")
    parser.add_argument("--max-tokens", type=int, default=48, help="new tokens per answer (default 48)")
    parser.add_argument("--interactive", action="store_true",
                        help="after the prompts, keep a chat prompt open (the bootstrap address is "
                             "printed at start, for `pymesh monitor --once --bootstrap ADDR`)")
    parser.add_argument("--model-path", default=None, metavar="PATH",
                        help="a Hugging Face model folder or a GGUF file, served in its own quantization "
                             "(default: the embedded SmolLM2-135M-Instruct, pulled and converted on first use; "
                             "its GGUF file is ~/.cache/pymesh/gguf/SmolLM2-135M-Instruct.Q4_1.gguf)")
    parser.add_argument("--transport", choices=[t.value for t in Transport], default=Transport.QUIC.value)
    parser.add_argument("--placement", choices=("auto", "split"), default="auto",
                        help="auto: workers choose their blocks from the swarm (default); "
                             "split: explicit --layers, an even split")
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds to wait for the swarm to cover every block (default 240)")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the child processes' logs (their folder is printed at the end)")
    add_allow_peers_argument(parser, "the demo's workers and client deal only with each other and the "
                                     "peers listed in FILE")
    parser.add_argument("--serve", action="store_true",
                        help="keep the swarm up behind the OpenAI-compatible API (pymesh serve) instead of "
                             "answering prompts; Ctrl-C stops it")
    parser.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT",
                        help="with --serve: the API's HTTP address (default 127.0.0.1:8000)")
    parser.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                        help="extra argument passed to every worker (repeatable, e.g. --worker-arg=--dtype "
                             "--worker-arg=bfloat16)")


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from rich.console import Console

    from pymesh.settings import settings_of
    from pymesh.demo.run import DEFAULT_PROMPTS, DemoOptions, run_demo
    from pymesh.errors import ConfigError

    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.max_tokens < 1:
        raise ConfigError("--max-tokens must be at least 1")
    options = DemoOptions(
        workers=args.workers,
        prompts=list(args.prompt) if args.prompt else list(DEFAULT_PROMPTS),
        max_tokens=args.max_tokens,
        interactive=args.interactive,
        model_path=Path(args.model_path) if args.model_path else None,
        transport=Transport(args.transport),
        placement=args.placement,
        timeout=args.timeout,
        keep_logs=args.keep_logs,
        worker_args=list(args.worker_arg),
        settings=settings_of(args),
        allow_peers=allow_peers_of(args),
        serve=args.serve,
        listen=args.listen,
    )
    if not args.verbose:
        # The demo narrates what happens; library INFO lines would drown it (-v brings them back).
        logging.getLogger("pymesh").setLevel(logging.WARNING)
    return run_demo(options, Console())
