"""``pymesh demo``: the embedded model, split over a local swarm, answering chat prompts.

Steps: pull SmolLM2-135M-Instruct if needed; start a bootstrap node and N workers on
loopback (automatic placement: each worker started once the previous one is online,
limited to its share of the blocks so they spread out); wait until every block is
served; show where each block landed; answer prompts through :class:`SwarmClient`,
streaming text and measuring tokens/s; stop every process (also on Ctrl-C/SIGTERM).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from pymesh.demo.procs import DemoError
from pymesh.demo.swarm import LocalSwarm, covered_blocks, model_matches
from pymesh.proto.allowlist import PeerAllowlist
from pymesh.proto.identity import PeerID
from pymesh.proto.records import WorkerRecord
from pymesh.proto.vocab import Transport, WorkerState
from pymesh.settings import Settings

log = logging.getLogger(__name__)

#: How long automatic placement gets to cover every block before the demo falls back
#: to an explicit split (workers re-check placement on a slower period than this).
AUTO_COVER_TIMEOUT = 60.0

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the ocean.",
)


@dataclass
class DemoOptions:
    workers: int = 3
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_tokens: int = 48
    interactive: bool = False
    model_path: Path | None = None
    transport: Transport = Transport.QUIC
    placement: str = "auto"            # "auto" | "split"
    timeout: float = 240.0
    keep_logs: bool = False
    worker_args: list[str] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)   # the CLI's (cache folder, client timers)
    #: --allow-peers: a private swarm of the demo's own nodes plus these peers (None: open)
    allow_peers: PeerAllowlist | None = None
    #: --serve: keep the swarm up behind the OpenAI-compatible API at ``listen`` instead of chatting
    serve: bool = False
    listen: str = "127.0.0.1:8000"


def even_split(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """Inclusive ranges splitting ``num_blocks`` into ``parts`` near-equal spans."""
    if not 0 < parts <= num_blocks:
        raise DemoError(f"cannot split {num_blocks} blocks over {parts} workers")
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(parts)]


def placement_table(records: list[WorkerRecord], model: str, num_blocks: int, names: dict[PeerID, str]) -> Table:
    """Which worker serves which blocks."""
    table = Table(title=f"where the {num_blocks} blocks landed", title_justify="left")
    for col in ("worker", "peer", "address", "blocks", "count", "tok/s"):
        table.add_column(col, justify="right" if col in ("count", "tok/s") else "left")
    mine = sorted(
        (r for r in records if r.state == WorkerState.ONLINE and model_matches(str(r.model_id), model)),
        key=lambda r: (r.start, r.stop),
    )
    for r in mine:
        table.add_row(names.get(r.peer_id, "?"), r.peer_id.short(), Text(f"{r.host}:{r.port}"),  # never markup
                      f"{r.start}-{r.stop - 1}", str(r.stop - r.start), f"{r.tokens_per_s:.1f}")
    return table


#: the worker flag capping how many blocks automatic placement takes (see ``pymesh worker --help``)
MAX_BLOCKS_FLAG = "--max-blocks"
#: the key name of the demo's in-process client (listed in a private swarm's allowlist)
CLIENT_NAME = "client"


class Demo:
    def __init__(self, options: DemoOptions, console: Console) -> None:
        self.o = options
        self.console = console
        self.model_dir: Path | None = None
        self.model_id = ""
        self.num_blocks = 0

    # ---- model ------------------------------------------------------------------------
    def prepare_model(self) -> None:
        from pymesh.model.config import load_config

        if self.o.model_path is None:
            from pymesh.model.pull import pull_default_model

            self.console.print("[bold]1.[/] the embedded model: SmolLM2-135M-Instruct")
            self.model_dir = Path(pull_default_model(progress=True, root=self.o.settings.runtime.cache_root(),
                                                     gguf=self.o.settings.runtime.smollm2_gguf))
        else:
            self.model_dir = Path(self.o.model_path)
        self.num_blocks = load_config(self.model_dir).num_hidden_layers
        try:
            from pymesh.model.fingerprint import model_id

            self.model_id = model_id(self.model_dir)
        except ImportError:
            self.model_id = self.model_dir.name
        kind = "GGUF file" if self.model_dir.is_file() else "model folder"
        self.console.print(f"   {kind} {self.model_dir} ({self.num_blocks} blocks, id {self.model_id})")

    # ---- swarm ------------------------------------------------------------------------
    def start_swarm(self, swarm: LocalSwarm) -> list[WorkerRecord]:
        assert self.model_dir is not None
        addr = swarm.start_bootstrap()
        self.console.print(f"[bold]2.[/] bootstrap node at [bold cyan]{addr}[/] "
                           f"({swarm.bootstrap_multiaddr}, pid {swarm.sup.children[-1].pid})")
        self.console.print(f"   watch it: [bold]pymesh monitor --bootstrap {addr}[/] "
                           f"(or add --once for a snapshot)")
        if self.o.placement == "auto":
            try:
                self.start_auto(swarm)
                return self.wait_for_coverage(swarm, timeout=min(self.o.timeout, AUTO_COVER_TIMEOUT))
            except DemoError as exc:
                if "timed out" not in str(exc):
                    raise
                self.console.print(f"   [yellow]automatic placement did not cover every block ({exc}); "
                                   "restarting the workers with an explicit even split[/]")
                for proc in list(swarm.workers):
                    swarm.stop_worker(proc)
        self.start_split(swarm)
        return self.wait_for_coverage(swarm, timeout=self.o.timeout)

    def start_auto(self, swarm: LocalSwarm) -> None:
        """Workers without --layers, each capped to its share, started one after another."""
        share = math.ceil(self.num_blocks / self.o.workers)
        for _ in range(self.o.workers):
            proc = swarm.start_worker(model_path=self.model_dir, transport=self.o.transport,
                                      extra_args=[*self.o.worker_args, MAX_BLOCKS_FLAG, str(share)])
            self.console.print(f"   {proc.name}: automatic placement, at most {share} blocks "
                               f"(port {proc.port}, pid {proc.child.pid})")
            # Let it announce before the next one chooses, so they spread out.
            swarm.wait_for_workers([proc], timeout=self.o.timeout)

    def start_split(self, swarm: LocalSwarm) -> None:
        for span in even_split(self.num_blocks, self.o.workers):
            proc = swarm.start_worker(model_path=self.model_dir, transport=self.o.transport,
                                      layers=span, extra_args=self.o.worker_args)
            self.console.print(f"   {proc.name}: --layers {span[0]}-{span[1]} "
                               f"(port {proc.port}, pid {proc.child.pid})")

    def wait_for_coverage(self, swarm: LocalSwarm, *, timeout: float) -> list[WorkerRecord]:
        columns = (TextColumn("   blocks served"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task("cover", total=self.num_blocks)

            def show(records: list[WorkerRecord]) -> None:
                progress.update(task, completed=sum(covered_blocks(records, self.model_id, self.num_blocks)))
                progress.refresh()

            records = swarm.wait_for_coverage(self.model_id, self.num_blocks, timeout=timeout, on_poll=show)
        names = {w.peer_id: w.name for w in swarm.workers}
        self.console.print(placement_table(records, self.model_id, self.num_blocks, names))
        return records

    # ---- chat -------------------------------------------------------------------------
    def answer(self, client: Any, tokenizer: Any, prompt: str | list[int], *,
               echo: str | None = None) -> tuple[Answer, str]:
        """Stream one answer to a chat prompt (text, or the ids of a templated conversation)."""
        from pymesh.model.sampling import SamplingParams

        params = SamplingParams(max_new_tokens=self.o.max_tokens)
        if echo is not None:
            self.console.print(f"[bold green]you>[/] {echo}", highlight=False)
        self.console.print("[bold blue]swarm>[/] ", end="")
        decoder = tokenizer.stream_decoder()
        pieces: list[str] = []
        t0 = time.perf_counter()
        first = last = t0
        n = 0
        chat = isinstance(prompt, str)
        for tok in _tokens(client.generate(prompt, params, chat=chat)):
            last = time.perf_counter()
            if n == 0:
                first = last
            n += 1
            pieces.append(decoder.push(tok))
            self.console.print(pieces[-1], end="", markup=False, highlight=False, soft_wrap=True)
            self.console.file.flush()
        pieces.append(decoder.flush())
        self.console.print(pieces[-1], markup=False, highlight=False)
        ttft = first - t0
        decode_tps = (n - 1) / (last - first) if n > 1 and last > first else 0.0
        self.console.print(f"   [dim]{n} tokens, first after {ttft * 1000:.0f} ms, "
                           f"{decode_tps:.1f} tokens/s decode[/]")
        return (n, ttft, decode_tps), "".join(pieces).strip()

    def chat(self, swarm: LocalSwarm) -> list[Answer]:
        from pymesh.client.api import SwarmClient
        from pymesh.model.tokenizer import load_tokenizer

        assert self.model_dir is not None
        tokenizer = load_tokenizer(self.model_dir)
        results: list[Answer] = []
        self.console.print("[bold]3.[/] chatting through the swarm (greedy, chat template on)")
        private = swarm.allow_peers is not None
        with SwarmClient([swarm.bootstrap_addr], self.model_dir, transport=self.o.transport,
                         settings=self.o.settings, allow_peers=swarm.allow_peers,
                         identity=swarm.identity(CLIENT_NAME) if private else None) as client:
            for prompt in self.o.prompts:
                results.append(self.answer(client, tokenizer, prompt, echo=prompt)[0])
            if self.o.interactive:
                results.extend(self.conversation(client, tokenizer))
        return results

    def conversation(self, client: Any, tokenizer: Any) -> list[Answer]:
        """A multi-turn chat: each turn sends the whole templated conversation so far."""
        self.console.print("   type a message (empty line or Ctrl-D to quit; /reset forgets the conversation)")
        history: list[dict[str, str]] = []
        results: list[Answer] = []
        while True:
            try:
                text = self.console.input("[bold green]you>[/] ").strip()
            except EOFError:
                break
            if not text:
                break
            if text == "/reset":
                history.clear()
                continue
            history.append({"role": "user", "content": text})
            ids = conversation_ids(tokenizer, history, HISTORY_TOKENS)
            stats, reply = self.answer(client, tokenizer, ids)
            history.append({"role": "assistant", "content": reply})
            results.append(stats)
        return results


#: (tokens, seconds to the first token, decode tokens/s) of one answer
Answer = tuple[int, float, float]

#: Older turns are dropped once the templated conversation is longer than this.
HISTORY_TOKENS = 1536


def conversation_ids(tokenizer: Any, history: list[dict[str, str]], max_tokens: int) -> list[int]:
    """Token ids of the templated conversation, dropping the oldest turns past ``max_tokens``."""
    turns = list(history)
    while True:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True)
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if len(ids) <= max_tokens or len(turns) <= 1:
            return ids
        turns = turns[2:] if len(turns) > 2 else turns[1:]


def _tokens(it: Any) -> Iterator[int]:
    for tok in it:
        yield int(tok)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_demo(options: DemoOptions, console: Console) -> int:
    """The whole demo; every process it started is gone when this returns or raises."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    demo = Demo(options, console)
    swarm: LocalSwarm | None = None
    try:
        demo.prepare_model()
        swarm = LocalSwarm(keep_workdir=options.keep_logs, settings=options.settings)
        with swarm:
            if options.allow_peers is not None:
                allow = swarm.make_private([*(f"worker{i}" for i in range(options.workers)), CLIENT_NAME],
                                           options.allow_peers)
                console.print(f"   private swarm: {len(allow)} peers allowed ({swarm.allow_file})")
            demo.start_swarm(swarm)
            if options.serve:
                from pymesh.demo.serve import serve_swarm

                assert demo.model_dir is not None
                serve_swarm(console, swarm, options, demo.model_dir, CLIENT_NAME)
            results = [] if options.serve else demo.chat(swarm)
            console.print("[bold]4.[/] stopping the swarm")
        summary(console, results)
        return 0
    except KeyboardInterrupt:
        console.print("\n[yellow]interrupted: stopping the swarm[/]")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if swarm is not None:
            alive = [c.name for c in swarm.sup.children if c.alive()]
            if alive:
                console.print(f"[red]still running after shutdown: {', '.join(alive)}[/]")
            else:
                console.print(f"   stopped {len(swarm.sup.children)} processes"
                              + (f"; logs kept in {swarm.workdir}" if options.keep_logs else ""))


def summary(console: Console, results: list[Answer]) -> None:
    if not results:
        return
    tokens = sum(r[0] for r in results)
    rates = [r[2] for r in results if r[2] > 0]
    ttfts = [r[1] for r in results]
    console.print(
        f"[bold]{len(results)} answers, {tokens} tokens; decode {sum(rates) / max(1, len(rates)):.1f} "
        f"tokens/s on average; first token after {1000 * sum(ttfts) / len(ttfts):.0f} ms on average[/]"
    )
