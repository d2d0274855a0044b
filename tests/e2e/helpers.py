"""Shared pieces of the end-to-end QA tests.

Processes come from ``tests.swarm.conftest.LocalProcs`` (real ``python -m pymesh`` children,
stopped by PID). This module adds what the e2e tests need on top: ``pymesh generate --json``
as a subprocess, Hugging Face ``transformers`` top-2 logit gaps for the near-tie rule, a raw
authenticated RPC client, RSS of a process, and UDP/TCP fuzz senders.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tests.swarm.conftest import FAST_ENV

ROOT = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **FAST_ENV, "PYTHONPATH": str(ROOT), **extra}
    return env


def pymesh_run(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m pymesh ARGS`` with the fast test timers; never hangs past ``timeout``."""
    return subprocess.run([sys.executable, "-m", "pymesh", *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env(**env))


def last_json(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert res.returncode == 0, f"command failed ({res.returncode}):\n{res.stderr[-4000:]}"
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.startswith("{")]
    assert lines, f"no JSON line on stdout:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return json.loads(lines[-1])


def generate_json(model_dir: Path, prompt: str, n: int, *, chat: bool = False) -> dict[str, Any]:
    args = ["generate", "--model-path", str(model_dir), "--prompt", prompt, "--max-tokens", str(n), "--json",
            "--threads", "1"]
    return last_json(pymesh_run(*args, *(["--chat"] if chat else [])))


def error_line(stderr: str) -> str:
    """The CLI's final ``pymesh <cmd>: error: ...`` line (what a user reads)."""
    lines = [ln for ln in stderr.splitlines() if ": error:" in ln]
    assert lines, f"no 'error:' line in stderr:\n{stderr[-3000:]}"
    return lines[-1]


# --- the near-tie rule, against transformers --------------------------------------------


def prompt_token_ids(model_dir: Path, prompt: str, chat: bool) -> list[int]:
    from pymesh.model.generate import prompt_ids
    from pymesh.model.tokenizer import load_tokenizer

    return list(prompt_ids(load_tokenizer(model_dir), prompt, chat))


def hf_gaps(model_dir: Path, prompt_ids: Sequence[int], generated: Sequence[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy choice and top-2 gap at every generated position (teacher-forced
    on ``generated``): one forward pass over prompt + generated tokens."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    ids = torch.tensor([list(prompt_ids) + list(generated)])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt_ids) - 1: len(prompt_ids) - 1 + len(generated)].float()
    top = torch.topk(logits, 2, dim=-1)
    return top.indices[:, 0].tolist(), (top.values[:, 0] - top.values[:, 1]).tolist()


def assert_ids_match(got: list[int], ref: list[int], model_dir: Path, prompt_ids: Sequence[int], what: str) -> None:
    """``got`` equals ``ref`` (pymesh generate); where they first differ, transformers' top-2
    gap on the common prefix must be a near tie (< 1e-3)."""
    n = min(len(got), len(ref))
    first = next((i for i in range(n) if got[i] != ref[i]), None)
    if first is None:
        assert len(got) == len(ref), f"{what}: {len(got)} tokens vs {len(ref)}\n got {got}\n ref {ref}"
        return
    _, gaps = hf_gaps(model_dir, prompt_ids, ref[: first + 1])
    assert gaps[first] < 1e-3, (f"{what}: token {first} differs ({got[first]} vs {ref[first]}) where transformers' "
                                f"top-2 gap is {gaps[first]:.3g}, not a near tie\n got {got}\n ref {ref}")


# --- processes ---------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# --- a raw authenticated RPC peer (its own identity) ---------------------------------


def with_rpc(worker: Any, script: Any, transport: str = "quic") -> Any:
    """Run ``await script(conn)`` on a fresh RpcNode connected to ``worker`` (a Proc with
    ``port`` and ``peer_id``); bounded in time."""
    import trio

    from pymesh.net.rpc import RpcNode
    from pymesh.proto.identity import Identity, PeerID

    async def main() -> Any:
        async with RpcNode(Identity.generate(), transport=transport) as node:
            with trio.fail_after(20):
                conn = await node.connect("127.0.0.1", worker.port, PeerID.from_text(worker.peer_id))
            with trio.fail_after(150):
                return await script(conn)

    return trio.run(main)


async def call(conn: Any, method: str, meta: dict[str, Any], tensors: Any = ()) -> tuple[str, Any]:
    """One call; returns ("ok", meta) or (error code, message) for a RemoteError."""
    from pymesh.net.rpc import RemoteError

    try:
        m, _ = await conn.call(method, meta, list(tensors), timeout=20)
        return "ok", m
    except RemoteError as exc:
        return exc.code, exc.message


def worker_info(worker: Any) -> dict[str, Any]:
    async def script(conn: Any) -> Any:
        code, meta = await call(conn, "pm.info", {})
        assert code == "ok", (code, meta)
        return meta

    return with_rpc(worker, script)


# --- hostile senders ---------------------------------------------------------------------


def udp_garbage(port: int, *, count: int = 300, seed: int = 7, host: str = "127.0.0.1") -> int:
    """Send random, truncated-KRPC, QUIC-looking and oversized datagrams; returns how many."""
    rng = random.Random(seed)
    templates = [b"d1:ad2:id20:", b"d1:q4:ping1:t2:aa1:y1:qe", b"\xc0\x00\x00\x00\x01", b"\x40" + bytes(30),
                 b"d1:ad2:id20:" + bytes(20) + b"e1:q9:find_node1:t2:xx1:y1:qe", b"i99999999999999999999999e",
                 b"l" * 5000, b"d" * 5000]
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(count):
            kind = i % 4
            if kind == 0:
                data = rng.randbytes(rng.randint(0, 1500))
            elif kind == 1:
                t = rng.choice(templates)
                data = t[: rng.randint(0, len(t))]
            elif kind == 2:
                t = bytearray(rng.choice(templates))
                for _ in range(3):
                    if t:
                        t[rng.randrange(len(t))] = rng.randrange(256)
                data = bytes(t)
            else:
                data = rng.randbytes(rng.choice([1201, 9000, 65000]))
            try:
                s.sendto(data, (host, port))
                sent += 1
            except OSError:
                pass
            if i % 50 == 0:
                time.sleep(0.01)
    return sent


def tcp_garbage(port: int, payloads: Sequence[bytes], *, host: str = "127.0.0.1", hold: float = 0.5) -> list[str]:
    """Open one TCP connection per payload, send it, read briefly; returns what happened."""
    out = []
    for p in payloads:
        with socket.create_connection((host, port), timeout=5) as s:
            s.settimeout(hold)
            try:
                s.sendall(p)
                data = s.recv(4096)
                out.append(f"recv {len(data)}")
            except (socket.timeout, TimeoutError):
                out.append("timeout")
            except OSError as exc:
                out.append(f"oserror {exc.errno}")
    return out
