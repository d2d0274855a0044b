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
from types import ModuleType

from pymesh.errors import ConfigError
from pymesh.proto.allowlist import PeerAllowlist
from pymesh.proto.vocab import Transport
from pymesh.settings import Settings


def load_optional(module: str) -> ModuleType | None:
    """``import module``, or None when that module itself is missing from this build
    (an error inside it, or a missing dependency of it, still raises)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


def with_flags(settings: Settings, *, threads: int | None = None, max_blocks: int | None = None) -> Settings:
    """``settings`` with the flags that override a ``PYMESH_*`` value applied (None: unchanged)."""
    runtime, worker = settings.runtime, settings.worker
    if threads is not None:
        runtime = dataclasses.replace(runtime, threads=threads)
    if max_blocks is not None:
        worker = dataclasses.replace(worker, max_blocks=max_blocks)
    return dataclasses.replace(settings, runtime=runtime, worker=worker)


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


def add_swarm_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every swarm client shares (``pymesh client``, ``pymesh serve``): where the head
    runs, the transport, threads, the allowlist and the client's own key."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--transport", default=Transport.QUIC.value, choices=[t.value for t in Transport])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: $PYMESH_THREADS or half the cores)")
    add_allow_peers_argument(parser, "route only through listed workers")
    parser.add_argument("--identity", default=None, metavar="FILE",
                        help="this client's key file (created on first use); workers of a private swarm serve "
                             "only clients their --allow-peers lists (default: a fresh key each run)")
