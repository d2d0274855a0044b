"""The seed's three-terminal flow with the real SmolLM2, driven as a user would.

``pymesh bootstrap`` + three ``pymesh worker`` processes (layers 0-9, 10-19, 20-29, both
transports) + ``pymesh client`` runs with prompts the team's own tests do not use (raw,
unicode, a ~100-token prompt, chat), each against ``pymesh generate --json`` on the same
folder; a mismatch is accepted only where transformers' top-2 gap is a near tie. The
bootstrap is spelled HOST:PORT, /ip4/.../udp/P and /ip4/.../udp/P/p2p/<id>; one run uses TCP.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.helpers import assert_ids_match, generate_json, last_json, prompt_token_ids
from tests.swarm.conftest import LocalProcs, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LONG_PROMPT = (
    "The history of the lighthouse begins in antiquity, when fires were lit on hilltops to guide ships "
    "into harbour. The Pharos of Alexandria, built in the third century BC, stood for more than a thousand "
    "years and became the model for towers across the Mediterranean. In the nineteenth century, Fresnel "
    "lenses multiplied the reach of the light, and keepers lived in small houses at the foot of each tower, "
    "trimming wicks and winding clockwork through every night of the year. Today most lights are automatic, and"
)

#: (name, prompt, chat, bootstrap spelling, transport)
CASES = [
    ("raw-hostport", "The three primary colours are", False, "hostport", "quic"),
    ("unicode-multiaddr", "Ünïcödé ✓ — 日本語: 東京は", False, "multiaddr", "quic"),
    ("long-p2p", LONG_PROMPT, False, "p2p", "quic"),
    ("chat-tcp", "Name two planets of the solar system.", True, "hostport", "tcp"),
]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[LocalProcs]:
    procs = LocalProcs(tmp_path_factory.mktemp("e2e-flow"))
    try:
        boot = procs.start_bootstrap()
        m = re.search(r"peer id: ([a-z2-7]{52})", boot.text())
        assert m, f"bootstrap printed no peer id:\n{boot.text()}"
        procs.boot_peer = m.group(1)  # type: ignore[attr-defined]
        workers = [procs.start_worker("--layers", f"{a}-{a + 9}", "--model-path", str(smollm2_dir),
                                      "--transport", "both", name=f"flow{a}") for a in (0, 10, 20)]
        wait_ready(workers, timeout=150)
        procs.workers = workers  # type: ignore[attr-defined]
        yield procs
    finally:
        procs.stop_all()


def test_bootstrap_prints_peer_id_and_addresses(swarm: LocalProcs) -> None:
    text = swarm.procs[0].text()
    port = swarm.bootstrap_addr.rsplit(":", 1)[1]
    assert f"bootstrap address: 127.0.0.1:{port}" in text
    assert f"bootstrap multiaddr: /ip4/127.0.0.1/udp/{port}/p2p/{swarm.boot_peer}" in text  # type: ignore[attr-defined]


def test_worker_logs_the_seed_lines(swarm: LocalProcs) -> None:
    for w, a in zip(swarm.workers, (0, 10, 20)):  # type: ignore[attr-defined]
        text = w.text()
        assert f"Worker announcing layers {a}-{a + 9}" in text, text[-2000:]
        assert "Worker bootstrapped" in text


@pytest.mark.parametrize("name,prompt,chat,spelling,transport", CASES, ids=[c[0] for c in CASES])
def test_client_equals_generate(swarm: LocalProcs, smollm2_dir: Path, name: str, prompt: str, chat: bool,
                                spelling: str, transport: str) -> None:
    n = 14
    port = swarm.bootstrap_addr.rsplit(":", 1)[1]
    boot = {"hostport": f"127.0.0.1:{port}", "multiaddr": f"/ip4/127.0.0.1/udp/{port}",
            "p2p": f"/ip4/127.0.0.1/udp/{port}/p2p/{swarm.boot_peer}"}[spelling]  # type: ignore[attr-defined]
    args = ["client", "--bootstrap", boot, "--model-path", str(smollm2_dir), "--prompt", prompt,
            "--max-tokens", str(n), "--transport", transport, "--json", *(["--chat"] if chat else [])]
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "pymesh", *args], capture_output=True, text=True, timeout=150,
                         env=swarm.env)
    out = last_json(res)
    ref = generate_json(smollm2_dir, prompt, n, chat=chat)
    ids = prompt_token_ids(smollm2_dir, prompt, chat)
    if name == "long-p2p":
        assert len(ids) >= 90, f"the long prompt should be ~100 tokens, got {len(ids)}"
    assert out["prompt_tokens"] == ref["prompt_tokens"] == len(ids)
    assert_ids_match(out["tokens"], ref["tokens"], smollm2_dir, ids, f"{name}: swarm vs pymesh generate")
    assert out["text"] == ref["text"] or out["tokens"] != ref["tokens"]
    assert [(h["start"], h["stop"]) for h in out["route"]] == [(0, 10), (10, 20), (20, 30)]
    assert out["recoveries"] == []
    # the seed's client log lines
    assert "Client: found provider for layer 0" in res.stderr
    assert "Client: resolved chain" in res.stderr


def test_generate_agrees_with_transformers_on_a_new_prompt(smollm2_dir: Path) -> None:
    """pymesh generate (the swarm's baseline) against transformers itself, greedy."""
    prompt = "Ünïcödé ✓ — 日本語: 東京は"
    ref = generate_json(smollm2_dir, prompt, 10)
    ids = prompt_token_ids(smollm2_dir, prompt, False)
    from tests.e2e.helpers import hf_gaps

    hf_ids, gaps = hf_gaps(smollm2_dir, ids, ref["tokens"])
    for i, (a, b) in enumerate(zip(ref["tokens"], hf_ids)):
        assert a == b or gaps[i] < 1e-3, f"step {i}: pymesh {a}, transformers {b} (gap {gaps[i]:.3g})"


def test_streamed_text_equals_json_text(swarm: LocalProcs, smollm2_dir: Path) -> None:
    """Without --json the client streams text to stdout: it must be the same answer."""
    prompt = "What is the capital of France?"
    res = swarm.client("--model-path", str(smollm2_dir), "--prompt", prompt, "--chat", "--max-tokens", "10",
                       timeout=150)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = generate_json(smollm2_dir, prompt, 10, chat=True)
    assert res.stdout.strip() == ref["text"].strip()
    assert "Paris" in res.stdout
