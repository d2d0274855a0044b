"""Pure pieces of ``pymesh demo``: the even split, coverage from records, the placement table."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest
from rich.console import Console

from pymesh.demo.procs import DemoError
from pymesh.demo.run import MAX_BLOCKS_FLAG, even_split, placement_table
from pymesh.demo.swarm import covered_blocks, model_matches
from pymesh.proto.identity import Identity


@dataclass
class Rec:
    peer_id: object
    model_id: str
    start: int
    stop: int
    state: str = "online"
    host: str = "127.0.0.1"
    port: int = 9100
    tokens_per_s: float = 50.0


def test_even_split_covers_every_block_once() -> None:
    assert even_split(30, 3) == [(0, 9), (10, 19), (20, 29)]
    for blocks, parts in ((30, 4), (7, 3), (5, 5), (1, 1), (16, 3)):
        spans = even_split(blocks, parts)
        served = [b for a, z in spans for b in range(a, z + 1)]
        assert served == list(range(blocks))
        assert max(z - a for a, z in spans) - min(z - a for a, z in spans) <= 1
    with pytest.raises(DemoError, match="cannot split 2 blocks over 3 workers"):
        even_split(2, 3)


def test_coverage_counts_only_online_records_of_the_model() -> None:
    p = [Identity.generate().peer_id for _ in range(4)]
    recs = [Rec(p[0], "smol@ab", 0, 10), Rec(p[1], "smol@ab", 10, 20, state="joining"),
            Rec(p[2], "other@cd", 10, 30), Rec(p[3], "smol@ab", 20, 30)]
    cover = covered_blocks(recs, "smol@ab", 30)
    assert cover == [True] * 10 + [False] * 10 + [True] * 10
    assert covered_blocks(recs, "smol", 30) == cover  # bare name matches any fingerprint
    assert model_matches("smol@ab", "smol") and not model_matches("smol2@ab", "smol")


def test_placement_table_names_workers_and_spans() -> None:
    p = [Identity.generate().peer_id for _ in range(2)]
    recs = [Rec(p[1], "m@x", 15, 30, port=9102, tokens_per_s=80.5), Rec(p[0], "m@x", 0, 15)]
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(placement_table(recs, "m@x", 30, {p[0]: "worker0", p[1]: "worker1"}))
    text = console.export_text()
    assert "where the 30 blocks landed" in text
    lines = [line for line in text.splitlines() if "worker" in line and "│" in line]
    assert "worker0" in lines[0] and "0-14" in lines[0] and p[0].short() in lines[0]
    assert "worker1" in lines[1] and "15-29" in lines[1] and "80.5" in lines[1]


def test_worker_accepts_the_demos_limit_flag() -> None:
    """The demo caps automatically placed workers with MAX_BLOCKS_FLAG: the worker must know it."""
    import argparse

    from pymesh.cli import worker

    parser = argparse.ArgumentParser()
    worker.add_arguments(parser)
    args = parser.parse_args(["--bootstrap", "127.0.0.1:1", MAX_BLOCKS_FLAG, "5"])
    assert args.max_blocks == 5


def test_conversation_ids_keep_turns_and_drop_the_oldest(smollm2_dir) -> None:  # type: ignore[no-untyped-def]
    from pymesh.demo.run import conversation_ids
    from pymesh.model.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    history = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    ids = conversation_ids(tok, history, 10_000)
    text = tok.decode(ids, skip_special_tokens=False)
    assert "My name is Ada." in text and "What is my name?" in text
    assert text.rstrip().endswith("assistant")  # generation prompt opened
    single = conversation_ids(tok, history[-1:], 10_000)
    short = conversation_ids(tok, history, len(single))
    assert short == single  # the first exchange was dropped to fit
