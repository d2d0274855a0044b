"""``pymesh generate``: single-process generation, the baseline the swarm is measured against.

Streams text to stdout as it is generated; with ``--json`` prints one object with
keys tokens, text, prompt_tokens, prefill_s, decode_tokens_per_s instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("pymesh.generate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pymesh.cli.common import add_quantize_argument
    from pymesh.model.sampling import add_sampling_arguments

    parser.add_argument("--model-path", required=True, metavar="PATH",
                        help="Hugging Face model folder (config.json, model.safetensors, tokenizer.json) "
                             "or a GGUF file (served in its own quantization)")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--max-tokens", type=int, default=64, help="most new tokens to generate (default 64)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_quantize_argument(parser, "compute the weight matrices")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: $PYMESH_THREADS or every core this process may use)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary instead of streaming text")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pymesh.cli.common import check_device
    from pymesh.errors import ConfigError
    from pymesh.model.config import load_config
    from pymesh.model.generate import LocalModel, eos_ids, make_stop_check, prompt_ids
    from pymesh.model.sampling import StopText, sampling_params_from_args
    from pymesh.model.tokenizer import load_tokenizer
    from pymesh.model.torch_setup import configure_threads
    from pymesh.model.gguf_file import is_gguf
    from pymesh.settings import settings_of

    configure_threads(settings_of(args).runtime.threads_or(args.threads), shared=False)  # one process alone: every core
    params = sampling_params_from_args(args)
    check_device(args.device)  # one line, not a torch traceback, for --device cuda without CUDA
    root = Path(args.model_path)
    if not (root.is_dir() or is_gguf(root) and root.is_file()):
        raise ConfigError(f"--model-path {root} does not exist or is not a folder; give a Hugging Face model "
                          f"folder or a .gguf file (or run `pymesh model pull` and use the folder it prints)")
    load_config(root)  # config errors (unsupported model type, ...) before tokenizer errors
    tokenizer = load_tokenizer(args.model_path)
    ids = prompt_ids(tokenizer, args.prompt, args.chat)
    model = LocalModel.load(args.model_path, device=args.device, dtype=args.dtype, progress=not args.json,
                            quantize=args.quantize)
    log.info("prompt: %d tokens; generating up to %d", len(ids), params.max_new_tokens)
    stop_check = make_stop_check(tokenizer, params.stop) if params.stop else None
    decoder = tokenizer.stream_decoder()
    stop_text = StopText(params.stop)
    tokens: list[int] = []
    out = sys.stdout
    t0 = time.perf_counter()
    t_first = t_last = t0
    for token in model.generate_ids(ids, params, eos_ids=eos_ids(model.config, tokenizer), stop_check=stop_check):
        t_last = time.perf_counter()
        if not tokens:
            t_first = t_last
        tokens.append(token)
        if not args.json:
            out.write(stop_text.push(decoder.push(token)))
            out.flush()
    tail = stop_text.push(decoder.flush()) + stop_text.flush()
    prefill_s = t_first - t0
    decode_rate = (len(tokens) - 1) / (t_last - t_first) if len(tokens) > 1 and t_last > t_first else 0.0
    if args.json:
        text = tokenizer.decode(tokens)
        for s in params.stop:
            if s in text:
                text = text[: text.index(s)]
        json.dump({"tokens": tokens, "text": text, "prompt_tokens": len(ids), "prefill_s": round(prefill_s, 4),
                   "decode_tokens_per_s": round(decode_rate, 2)}, out)
        out.write("\n")
    else:
        out.write(tail + "\n")
        out.flush()
    log.info("%d prompt tokens, prefill %.3f s, %d new tokens at %.1f tokens/s",
             len(ids), prefill_s, len(tokens), decode_rate)
    return 0
