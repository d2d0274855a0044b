"""Local swarms of real processes on loopback for the swarm tests.

``LocalProcs`` starts a bootstrap node and workers as ``python -m pymesh ...`` child
processes under the demo's :class:`~pymesh.demo.procs.Supervisor` (own session, log file,
SIGTERM then SIGKILL, no orphans), with short timers (heartbeat, record TTL, timeouts) and
one torch thread each. ``procs.settings`` holds the same short timers for the in-process
clients the tests build (``Swarm(..., settings=procs.settings)``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest

from pymesh.demo.procs import Child, DemoError, Supervisor, free_port, pymesh_argv
from pymesh.settings import Settings, load_settings

__all__ = ["FAST_ENV", "LocalProcs", "Proc", "assert_same_tokens", "free_port", "identity_peer",
           "reference_run", "wait_ready"]

#: environment of every child process: short timers so tests run in seconds
FAST_ENV = {
    "PYMESH_HEARTBEAT": "1",
    "PYMESH_RECORD_TTL": "5",
    "PYMESH_DHT_TIMEOUT": "1",
    "PYMESH_THREADS": "1",
    "PYMESH_SKIP_THROUGHPUT": "1",
    "PYMESH_DISCOVERY_TIMEOUT": "10",
    "PYMESH_STEP_TIMEOUT": "15",
    "PYMESH_TRANSPORT_TIMEOUT": "10",
    "PYMESH_REBALANCE_PERIOD": "2",
    "OMP_WAIT_POLICY": "PASSIVE",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class Proc:
    """One child of a :class:`LocalProcs` (the supervisor's :class:`Child`) and what the
    tests learn about it (peer id, ports, identity file)."""

    def __init__(self, child: Child, sup: Supervisor) -> None:
        self.child = child
        self.sup = sup
        self.peer_id: str | None = None
        self.port: int | None = None
        self.identity: str | None = None

    @property
    def name(self) -> str:
        return self.child.name

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        return self.child.popen

    @property
    def log(self) -> Path:
        return self.child.log_path

    def text(self) -> str:
        return self.child.log_text()

    def wait_for(self, needle: str, timeout: float = 60.0) -> str:
        try:
            return self.child.wait_for_output(needle, timeout)
        except DemoError as exc:
            raise AssertionError(str(exc)) from None

    def alive(self) -> bool:
        return self.child.alive()

    def signal(self, sig: int) -> None:
        self.child.signal(sig)

    def stop(self) -> int | None:
        return self.sup.stop(self.child)


class LocalProcs:
    """Bootstrap + workers for one test module; ``stop_all()`` stops every child."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.env = {**os.environ, **FAST_ENV, "PYMESH_HOME": str(root / "home"), **env}
        self.env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        #: the children's timers, for clients this test process builds
        self.settings: Settings = load_settings(self.env)
        self.sup = Supervisor(root, env=self.env)
        self.procs: list[Proc] = []
        self.bootstrap_addr = ""

    def spawn(self, name: str, args: Sequence[str], **env: str) -> Proc:
        child = self.sup.spawn(f"{len(self.procs) + 1:02d}-{name}", pymesh_argv(*args), extra_env=env)
        child.name = name
        p = Proc(child, self.sup)
        self.procs.append(p)
        return p

    def start_bootstrap(self) -> Proc:
        port = free_port()
        p = self.spawn("bootstrap", ["bootstrap", "--host", "127.0.0.1", "--port", str(port)])
        p.wait_for("bootstrap address", 60)
        p.port = port
        self.bootstrap_addr = f"127.0.0.1:{port}"
        return p

    def start_worker(self, *args: str, name: str = "worker", identity: str | None = None,
                     port: int | None = None, **env: str) -> Proc:
        port = port or free_port()
        ident = identity or str(self.root / f"{name}-{port}.key")
        p = self.spawn(name, ["worker", "--bootstrap", self.bootstrap_addr, "--host", "127.0.0.1",
                              "--port", str(port), "--identity", ident, *args], **env)
        p.port = port
        p.identity = ident
        return p

    def start_span_workers(self, spans: Sequence[tuple[int, int]], *args: str, prefix: str = "w",
                           timeout: float = 120) -> list[Proc]:
        """One worker per inclusive block range in ``spans`` (``args`` passed to each, e.g.
        ``--model-path DIR``), named ``<prefix><first block>``; returns them once all are ready."""
        workers = [self.start_worker("--layers", f"{a}-{b}", *args, name=f"{prefix}{a}") for a, b in spans]
        wait_ready(workers, timeout=timeout)
        return workers

    def client(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "pymesh", "client", "--bootstrap", self.bootstrap_addr, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**self.env, **env})

    def client_json(self, *args: str, timeout: float = 120, **env: str) -> dict[str, Any]:
        res = self.client(*args, "--json", timeout=timeout, **env)
        assert res.returncode == 0, f"client failed ({res.returncode}):\n{res.stderr[-4000:]}"
        return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def stop_all(self) -> None:
        """SIGTERM to every worker at once (each goodbye takes a moment), the bootstrap last."""
        self.sup.stop_all()


def wait_ready(workers: Sequence[Proc], timeout: float = 90) -> None:
    """Wait until every worker logged ``Worker bootstrapped`` and remember its peer ID."""
    import re

    for w in workers:
        text = w.wait_for("Worker bootstrapped", timeout)
        m = re.search(r"worker ([a-z2-7]{52}): transport", text)
        w.peer_id = m.group(1) if m else None


def identity_peer(path: str) -> str:
    from pymesh.proto.identity import Identity

    return Identity.load_or_create(path).peer_id.to_text()


@pytest.fixture(scope="session")
def tiny6_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with 6 blocks and SmolLM2's tokenizer (built once per session)."""
    from tests.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny6"), num_hidden_layers=6, name="tiny6")


# --- reference generation with the margins the near-tie rule needs ------------------


def reference_run(model_dir: Path, prompt: str, max_new_tokens: int, *, chat: bool = False,
                  quantize: str | None = None) -> tuple[list[int], list[float]]:
    """Greedy ids of the single-process model (``quantize``: its weight matrices in that block
    format) and, per step, the gap between its top-2 logits."""
    import torch

    from pymesh.model.generate import LocalModel, prompt_ids
    from pymesh.model.tokenizer import load_tokenizer

    model = LocalModel.load(model_dir, quantize=quantize)
    tok = load_tokenizer(model_dir)
    ids = prompt_ids(tok, prompt, chat)
    eos = set(model.config.eos_token_id) | set(tok.eos_token_ids or [])
    cache = model.span.new_cache(len(ids) + max_new_tokens)
    hidden = model.head.embed(torch.tensor([ids]))
    pos, out_ids, gaps = 0, [], []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = model.span.forward(hidden, cache, pos)
            pos += hidden.shape[1]
            logits = model.head.logits(out[0, -1])
            top = torch.topk(logits, 2).values
            gaps.append(float(top[0] - top[1]))
            token = int(torch.argmax(logits))
            out_ids.append(token)
            if token in eos:
                break
            hidden = model.head.embed(torch.tensor([[token]]))
    return out_ids, gaps


def assert_same_tokens(got: list[int], ref: list[int], gaps: list[float], what: str = "") -> None:
    """Equal greedy ids; a divergence is accepted only at a near tie (< 1e-3) of the reference."""
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            assert gaps[i] < 1e-3, (
                f"{what}: token {i} differs ({a} vs reference {b}) and the reference's top-2 gap there "
                f"is {gaps[i]:.2e}, not a near tie\n got {got}\n ref {ref}")
            return
    assert len(got) == len(ref), f"{what}: {len(got)} tokens vs {len(ref)} in the reference\n got {got}\n ref {ref}"


def generate_killing(procs: LocalProcs, model_path: Path, prompt: str, n: int, *, after: int, start: int,
                     workers: Sequence[Proc]) -> tuple[list[int], Any, str]:
    """Greedy generation through ``SwarmClient`` that SIGKILLs, once ``after`` tokens came, the
    worker serving the route's hop that starts at block ``start``: (tokens, the client's last
    stats, the killed worker's peer id)."""
    import signal

    from pymesh.client.api import SwarmClient
    from pymesh.model.sampling import SamplingParams

    got: list[int] = []
    active = ""
    with SwarmClient([procs.bootstrap_addr], model_path, settings=procs.settings) as client:
        for token in client.generate(prompt, SamplingParams(max_new_tokens=n)):
            got.append(token)
            if len(got) == after:
                # The route is fixed now; kill the worker serving that hop in it.
                stats = client.last_stats
                assert stats is not None
                active = next(h["peer"] for h in stats.route if h["start"] == start)
                victim = next(w for w in workers if w.peer_id == active)
                victim.signal(signal.SIGKILL)
                victim.popen.wait(10)
        stats = client.last_stats
    assert stats is not None and active, f"generation ended before {after} tokens: {got}"
    return got, stats, active
