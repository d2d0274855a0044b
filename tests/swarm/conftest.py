"""Local swarms of real processes on loopback for the swarm tests.

``LocalProcs`` starts a bootstrap node and workers as ``python -m pymesh ...`` child
processes with short timers (heartbeat, record TTL, timeouts) and one torch thread
each, logs to files, waits for their log lines, and stops them by PID at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import pytest

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


def _free(port: int, kind: int) -> bool:
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


_used: set[int] = set()


def free_port() -> int:
    """A port P with UDP P, TCP P and UDP P+1 free (transport and DHT of one node)."""
    for _ in range(200):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port >= 65000 or port in _used or port + 1 in _used:
            continue
        if _free(port, socket.SOCK_STREAM) and _free(port + 1, socket.SOCK_DGRAM) and _free(port + 1, socket.SOCK_STREAM):
            _used.update((port, port + 1))
            return port
    raise RuntimeError("no free port pair found on 127.0.0.1")


class Proc:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._fh = open(log, "wb")
        self.popen = subprocess.Popen(argv, stdout=self._fh, stderr=subprocess.STDOUT, env=env)
        self.peer_id: str | None = None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if needle in text:
                return text
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.popen.returncode}) before {needle!r}:\n{text[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: no {needle!r} within {timeout:.0f} s:\n{self.text()[-3000:]}")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._fh.close()
        return self.popen.returncode


#: knobs the in-process client (the Python API in the test process) reads
CLIENT_KNOBS = ("PYMESH_STEP_TIMEOUT", "PYMESH_DISCOVERY_TIMEOUT", "PYMESH_DHT_TIMEOUT", "PYMESH_TRANSPORT_TIMEOUT",
                "PYMESH_HEARTBEAT", "PYMESH_RECORD_TTL")


class LocalProcs:
    """Bootstrap + workers for one test module; use as a context manager.

    Inside it, the test process's own environment carries the same short client
    timeouts as the children (restored on exit)."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self._mp = pytest.MonkeyPatch()
        self.env = {**os.environ, **FAST_ENV, "PYMESH_HOME": str(root / "home"), **env}
        for knob in CLIENT_KNOBS:
            self._mp.setenv(knob, self.env[knob])
        self.env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        self.procs: list[Proc] = []
        self.bootstrap_addr = ""
        self._n = 0

    def spawn(self, name: str, args: Sequence[str], **env: str) -> Proc:
        self._n += 1
        argv = [sys.executable, "-m", "pymesh", *args]
        p = Proc(name, argv, self.root / f"{self._n:02d}-{name}.log", {**self.env, **env})
        self.procs.append(p)
        return p

    def start_bootstrap(self) -> Proc:
        port = free_port()
        p = self.spawn("bootstrap", ["bootstrap", "--host", "127.0.0.1", "--port", str(port)])
        p.wait_for("bootstrap address", 60)
        self.bootstrap_addr = f"127.0.0.1:{port}"
        return p

    def start_worker(self, *args: str, name: str = "worker", identity: str | None = None,
                     port: int | None = None, **env: str) -> Proc:
        port = port or free_port()
        ident = identity or str(self.root / f"{name}-{port}.key")
        p = self.spawn(name, ["worker", "--bootstrap", self.bootstrap_addr, "--host", "127.0.0.1",
                              "--port", str(port), "--identity", ident, *args], **env)
        p.port = port  # type: ignore[attr-defined]
        p.identity = ident  # type: ignore[attr-defined]
        return p

    def client(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "pymesh", "client", "--bootstrap", self.bootstrap_addr, *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**self.env, **env})

    def client_json(self, *args: str, timeout: float = 120, **env: str) -> dict[str, Any]:
        res = self.client(*args, "--json", timeout=timeout, **env)
        assert res.returncode == 0, f"client failed ({res.returncode}):\n{res.stderr[-4000:]}"
        return json.loads(res.stdout.strip().splitlines()[-1])

    def stop_all(self) -> None:
        for p in self.procs:  # all at once: each worker's goodbye takes a moment
            p.signal(signal.SIGTERM)
        for p in reversed(self.procs):
            p.stop()
        self._mp.undo()


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


def reference_run(model_dir: Path, prompt: str, max_new_tokens: int, *, chat: bool = False) -> tuple[list[int], list[float]]:
    """Greedy ids of the single-process model and, per step, the gap between its top-2 logits."""
    import torch

    from pymesh.model.generate import LocalModel, prompt_ids
    from pymesh.model.tokenizer import load_tokenizer

    model = LocalModel.load(model_dir)
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
