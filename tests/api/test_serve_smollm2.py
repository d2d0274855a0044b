"""`pymesh serve` on the embedded model (SmolLM2-135M-Instruct, 30 blocks over two workers),
driven the way the README shows: the openai SDK's chat call and stream, and curl-style
plain HTTP for /v1/models and /health. Greedy text equals `pymesh generate --chat`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.swarm.conftest import LocalProcs, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Any]:
    procs = LocalProcs(tmp_path_factory.mktemp("api-smollm2"))
    try:
        procs.start_bootstrap()
        procs.start_span_workers([(0, 14), (15, 29)], "--model-path", str(smollm2_dir), prefix="smol", timeout=180)
        port = free_port()
        serve = procs.spawn("serve", ["serve", "--bootstrap", procs.bootstrap_addr, "--model-path", str(smollm2_dir),
                                      "--listen", f"127.0.0.1:{port}"], PYMESH_DISCOVERY_TIMEOUT="3")
        serve.wait_for("OpenAI-compatible API at", 120)
        procs.model_dir = smollm2_dir  # type: ignore[attr-defined]
        procs.base = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        yield procs
    finally:
        procs.stop_all()


def test_readme_sdk_example_equals_generate(served: Any) -> None:
    from openai import OpenAI

    question = "Name three primary colors."
    res = subprocess.run([sys.executable, "-m", "pymesh", "generate", "--model-path", str(served.model_dir),
                          "--prompt", question, "--chat", "--max-tokens", "16", "--json"],
                         capture_output=True, text=True, timeout=180, env=served.env)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = json.loads(res.stdout.strip().splitlines()[-1])

    client = OpenAI(base_url=served.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                           max_tokens=16)
    assert reply.choices[0].message.content == ref["text"]
    assert reply.usage.completion_tokens == len(ref["tokens"])
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, stream=True, max_tokens=16, messages=[{"role": "user", "content": question}]) if c.choices)
    assert streamed == ref["text"]


def test_models_and_health_over_plain_http(served: Any) -> None:
    with urllib.request.urlopen(served.base + "/v1/models", timeout=30) as resp:
        models = json.loads(resp.read())
    assert [m["id"] for m in models["data"]] == [NAME]
    with urllib.request.urlopen(served.base + "/health", timeout=30) as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["missing_layer"] is None, health
    assert health["blocks"] == health["blocks_covered"] == 30 and health["workers"] == 2, health
