"""What several subcommands share: the settings ``main`` read, device checks, flag overrides.

``pymesh.cli.main`` reads the environment once (:func:`pymesh.settings.load_settings`) and
puts the result on the parsed arguments as ``args.settings``; subcommands take their parts
from there (:func:`pymesh.settings.settings_of`) and let their flags override them
(:func:`with_flags`). Imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from pymesh.errors import ConfigError
from pymesh.proto.allowlist import PeerAllowlist
from pymesh.proto.records import QUANT_LABELS
from pymesh.proto.vocab import Transport
from pymesh.settings import VERIFY_MODES, Settings, settings_of

if TYPE_CHECKING:
    from pymesh.client.blocklist import Blocklist

#: the file name of the default blocklist, under PYMESH_HOME
BLOCKLIST_FILE = "blocklist.json"


def load_optional(module: str) -> ModuleType | None:
    """``import module``, or None when that module itself is missing from this build
    (an error inside it, or a missing dependency of it, still raises)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


def with_flags(settings: Settings, *, threads: int | None = None, max_blocks: int | None = None,
               verify: str | None = None, verify_rate: float | None = None, batching: bool | None = None,
               batch_tokens: int | None = None, allow_mixed: bool | None = None) -> Settings:
    """``settings`` with the flags that override a ``PYMESH_*`` value applied (None: unchanged)."""
    runtime, worker, client = settings.runtime, settings.worker, settings.client
    if threads is not None:
        runtime = dataclasses.replace(runtime, threads=threads)
    if max_blocks is not None:
        worker = dataclasses.replace(worker, max_blocks=max_blocks)
    if batching is not None:
        worker = dataclasses.replace(worker, batching=batching)
    if batch_tokens is not None:
        worker = dataclasses.replace(worker, batch_tokens=batch_tokens)
    if verify is not None:
        if verify not in VERIFY_MODES:
            raise ConfigError(f"--verify {verify!r}: choose one of {', '.join(VERIFY_MODES)}")
        client = dataclasses.replace(client, verify=verify)
    if verify_rate is not None:
        if not 0.0 <= verify_rate <= 1.0:
            raise ConfigError(f"--verify-rate {verify_rate}: a fraction of hop-steps, between 0 and 1")
        client = dataclasses.replace(client, verify_rate=verify_rate)
    if allow_mixed is not None:
        client = dataclasses.replace(client, allow_mixed=allow_mixed)
    return dataclasses.replace(settings, runtime=runtime, worker=worker, client=client)


def swarm_client_settings(args: argparse.Namespace) -> Settings:
    """The settings of a swarm client (``pymesh client``, ``pymesh serve``) with its
    ``--verify`` / ``--verify-rate`` / ``--allow-mixed`` flags applied."""
    return with_flags(settings_of(args), verify=getattr(args, "verify", None),
                      verify_rate=getattr(args, "verify_rate", None),
                      allow_mixed=True if getattr(args, "allow_mixed", False) else None)


def add_quantize_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--quantize {q8_0,q4_0,q4_1}``: compute a float folder's weight matrices in that block
    format (quantized at load); the model id gets the suffix, so only workers of the same
    quantization are routed through (issue 15)."""
    parser.add_argument("--quantize", default=None, choices=list(QUANT_LABELS),
                        help=f"{what} in this GGUF block format, quantized at load from a safetensors folder "
                             "(model id name@fingerprint:FORMAT; default: the weights' own precision)")


def apply_runtime_switches(settings: Settings) -> None:
    """Set the model's process-wide switches (pymesh.model.switches) from the settings."""
    from pymesh.model.switches import set_switches

    set_switches(require_c=settings.runtime.require_c, fast_decode=settings.runtime.fast_decode)


def check_device(device: str) -> None:
    """ConfigError (one line) for a device this machine does not have."""
    if device == "cpu":
        return
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"--device {device!r} is not a device pymesh runs on; use cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no usable CUDA GPU (torch {torch.__version__}); "
                          "use --device cpu")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")



def add_allow_peers_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--allow-peers FILE`` (a private swarm), the same for every role that joins;
    ``what`` says what the role does with the list."""
    parser.add_argument("--allow-peers", default=None, metavar="FILE",
                        help=f"private swarm: {what}. FILE lists one peer ID a line, as `pymesh "
                             "identity show KEYFILE` prints it (# comments); default: an open swarm")


def allow_peers_of(args: argparse.Namespace) -> PeerAllowlist | None:
    """The allowlist ``--allow-peers`` names, or None (an open swarm)."""
    path = getattr(args, "allow_peers", None)
    return None if path is None else PeerAllowlist.load(path)


def add_blocklist_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--blocklist PATH|none`` (default ``<PYMESH_HOME>/blocklist.json``)."""
    parser.add_argument("--blocklist", default=None, metavar="PATH",
                        help=f"{what}; default $PYMESH_HOME/{BLOCKLIST_FILE} (~/.pymesh/{BLOCKLIST_FILE}); "
                             "'none': no file")


def blocklist_path_of(args: argparse.Namespace) -> Path | None:
    """The path ``--blocklist`` names (its default under PYMESH_HOME), or None for ``none``."""
    given = getattr(args, "blocklist", None)
    if given is None:
        return settings_of(args).runtime.home / BLOCKLIST_FILE
    if given.strip().lower() == "none":
        return None
    return Path(given).expanduser()


def blocklist_of(args: argparse.Namespace) -> "Blocklist | None":
    """The :class:`~pymesh.client.blocklist.Blocklist` ``--blocklist`` names (not loaded yet),
    or None for ``--blocklist none``."""
    from pymesh.client.blocklist import Blocklist

    path = blocklist_path_of(args)
    return None if path is None else Blocklist(path)


def add_swarm_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every swarm client shares (``pymesh client``, ``pymesh serve``): where the head
    runs, the transport, threads, the allowlist, the client's own key, verification of the
    workers' outputs and the blocklist of convicted workers."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--transport", default=Transport.QUIC.value, choices=[t.value for t in Transport])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: $PYMESH_THREADS or half the cores)")
    add_allow_peers_argument(parser, "route only through listed workers")
    parser.add_argument("--identity", default=None, metavar="FILE",
                        help="this client's key file (created on first use); workers of a private swarm serve "
                             "only clients their --allow-peers lists (default: a fresh key each run)")
    parser.add_argument("--verify", default=None, choices=list(VERIFY_MODES),
                        help="check the workers' outputs: off; sample (signed receipts every step plus spot "
                             "checks of a fraction of hop-steps on a second worker); all (every hop-step "
                             "re-run). Default: $PYMESH_VERIFY or sample (docs/VERIFY.md)")
    parser.add_argument("--verify-rate", type=float, default=None, metavar="R",
                        help="with --verify sample: the fraction of hop-steps spot-checked, 0..1 "
                             "(default: $PYMESH_VERIFY_RATE or 0.05)")
    add_blocklist_argument(parser, "workers convicted of wrong answers are never routed through and new "
                                   "convictions are added here, their evidence in evidence/ beside it")
    add_quantize_argument(parser, "compute the client's embedding and LM head")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="route through workers of every quantization of the model, not only those "
                             "of this client's (mixing precisions changes the outputs)")
