"""The monitor's view: ``render(state) -> rich renderable``, a pure function.

Layout, top to bottom: a header (swarm size, models, throughput, bootstrap
reachability), one coverage map per model (a cell per block, shaded by the throughput
serving it, gaps red), the table of workers, and the newest events. Every colour has a
plain-text twin (cell characters, words) so ``--once`` output and tests read the same
information without colours.

A worker on the client blocklist (``--blocklist``) is flagged: a red ``FLAGGED`` in its row, a
count in the header, a table of the flagged workers with the reason, and a ``flagged`` event
when it is first seen.

Fields a record's signer chose (model id, host, transports, event details) are already
escaped by :mod:`pymesh.monitor.state` and are always passed to rich as ``Text``, never as
a markup string: ``[/]`` or ``[link=...]`` in a model id is shown, not interpreted.
"""

from __future__ import annotations

import time

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pymesh.monitor.state import Event, MonitorState, WorkerView
from pymesh.monitor.text import printable
from pymesh.proto.vocab import WorkerState

#: Cell characters by share of the model's best-served block (gap first).
GAP_CELL = "×"
SHADES = ("░", "▒", "▓", "█")
SHADE_STYLES = ("yellow", "green", "green", "bold green")
EVENT_STYLES = {"joined": "green", "left": "red", "moved": "cyan", "state": "yellow", "flagged": "bold red"}
#: characters of a flagged worker's reason shown (the JSON snapshot has it all)
FLAG_CHARS = 100
#: rows of the flagged-workers table
FLAGGED_SHOWN = 8
EVENTS_SHOWN = 8
CELLS_PER_ROW = 50
#: coverage maps drawn at most (records can name any number of models; --model picks one)
MODELS_SHOWN = 8


def render(state: MonitorState) -> RenderableType:
    """The whole screen for one state."""
    parts: list[RenderableType] = [render_header(state)]
    models = state.models()
    if not models:
        parts.append(Text("no worker records in the DHT yet", style="yellow"))
    for model in models[:MODELS_SHOWN]:
        parts.append(render_coverage(state, model))
    if len(models) > MODELS_SHOWN:
        parts.append(Text(f"... and {len(models) - MODELS_SHOWN} more models (pick one with --model NAME)",
                          style="yellow"))
    parts.append(render_workers(state))
    if state.flagged_workers():
        parts.append(render_flagged(state))
    parts.append(render_events(state))
    return Group(*parts)


def render_header(state: MonitorState) -> RenderableType:
    live = state.live_workers()
    if state.bootstrap_ok is None:
        boot = Text("not checked", style="yellow")
    elif state.bootstrap_ok:
        boot = Text("reachable", style="green")
    else:
        boot = Text("UNREACHABLE", style="bold red")
    line = Text.assemble(
        ("workers ", "bold"), f"{len(live)} live / {len(state.workers)} records",
        ("   models ", "bold"), str(len(state.models())),
        ("   throughput ", "bold"), f"{state.total_tokens_per_s():.1f} tok/s (sum of spans)",
        ("   bootstrap ", "bold"), f"{state.bootstrap or '-'} ", boot,
    )
    lines = [line]
    flagged = state.flagged_workers()
    if flagged:
        lines.append(Text(f"{len(flagged)} flagged worker(s): on the blocklist (convicted of wrong answers); "
                          "clients using it never route through them", style="bold red"))
    if state.ignored:
        what = "unlisted signer (--allow-peers) or a span outside the model"
        lines.append(Text(f"{state.ignored} records ignored: {what}", style="yellow"))
    if state.error:
        lines.append(Text(f"last poll failed: {printable(state.error)}", style="red"))
    stamp = time.strftime("%H:%M:%S", time.localtime(state.now)) if state.now else "-"
    return Panel(Group(*lines), title="pymesh swarm", subtitle=f"poll {state.polls} at {stamp}")


def _cell(tps: float, best: float) -> tuple[str, str]:
    if tps <= 0.0:
        return GAP_CELL, "bold white on red"
    share = tps / best if best > 0 else 1.0
    i = min(len(SHADES) - 1, int(share * len(SHADES)))
    return SHADES[i], SHADE_STYLES[i]


def render_coverage(state: MonitorState, model_id: str) -> RenderableType:
    """One cell per block; gaps are red ``×``; the darker the cell, the more tok/s."""
    cover = state.block_throughput(model_id)
    best = max(cover, default=0.0)
    body = Text()
    for row_start in range(0, len(cover), CELLS_PER_ROW):
        row = cover[row_start:row_start + CELLS_PER_ROW]
        body.append(f"{row_start:>4} ", style="dim")
        for tps in row:
            ch, style = _cell(tps, best)
            body.append(ch, style=style)
        body.append(f" {row_start + len(row) - 1}\n", style="dim")
    gaps = state.gaps(model_id)
    if not cover:
        body.append("no blocks known", style="yellow")
    elif gaps:
        ranges = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in gaps)
        missing = sum(b - a + 1 for a, b in gaps)
        body.append(f"gaps: {ranges} ({missing} of {len(cover)} blocks unserved)", style="bold red")
    else:
        bottleneck = min(cover)
        body.append(
            f"all {len(cover)} blocks covered; bottleneck {bottleneck:.1f} tok/s", style="green"
        )
    n_live = sum(1 for w in state.workers_of(model_id) if w.live)
    return Panel(body, title=Text(f"coverage {model_id}"), subtitle=f"{n_live} live workers",
                 title_align="left")


def _age(w: WorkerView, now: float) -> str:
    if not now or not w.timestamp:
        return "-"
    return f"{max(0.0, now - w.timestamp):.0f}s"


def _cache(w: WorkerView) -> str:
    if w.cache_tokens_total <= 0:
        return "-"
    return f"{w.cache_tokens_free}/{w.cache_tokens_total}"


def _rtt(w: WorkerView) -> str:
    return "-" if w.rtt_ms is None else f"{w.rtt_ms:.1f}ms"


STATE_STYLES = {WorkerState.ONLINE: "green", WorkerState.JOINING: "yellow", WorkerState.OFFLINE: "red"}


def render_workers(state: MonitorState) -> RenderableType:
    table = Table(title="workers", title_justify="left", expand=False)
    for name, justify in (
        ("peer", "left"), ("model", "left"), ("address", "left"), ("transport", "left"),
        ("span", "right"), ("state", "left"), ("tok/s", "right"), ("ms/block", "right"),
        ("sessions", "right"), ("free cache", "right"), ("rtt", "right"), ("age", "right"),
        ("flag", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for model in state.models():
        for w in state.workers_of(model):
            table.add_row(
                Text(w.short),
                Text(w.model_label),
                Text(f"{w.host}:{w.port}" if w.reach == "direct" else f"behind NAT ({w.reach})"),
                Text(",".join(w.transports) or "-"),
                w.span_text(),
                Text(w.state, style=STATE_STYLES.get(w.state, "")),
                f"{w.tokens_per_s:.1f}",
                f"{w.block_ms:.2f}",
                str(w.sessions),
                _cache(w),
                _rtt(w),
                _age(w, state.now),
                Text("FLAGGED", style="bold red") if state.flag_of(w) is not None else Text("-"),
            )
    if not state.workers:
        table.add_row(*(["-"] * 13))
    return table


def render_flagged(state: MonitorState) -> RenderableType:
    """The flagged workers and why they are on the blocklist (already escaped)."""
    table = Table(title="flagged workers (on the blocklist)", title_justify="left", title_style="bold red",
                  box=None)
    table.add_column("peer", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("span", justify="right", no_wrap=True)
    table.add_column("why")
    flagged = state.flagged_workers()
    for w in flagged[:FLAGGED_SHOWN]:
        why = state.flag_of(w) or ""
        cut = why if len(why) <= FLAG_CHARS else why[:FLAG_CHARS - 1] + "…"
        table.add_row(Text(w.short, style="bold red"), Text(w.model_id.split("@", 1)[0]), w.span_text(), Text(cut))
    if len(flagged) > FLAGGED_SHOWN:
        table.add_row("", "", "", Text(f"... and {len(flagged) - FLAGGED_SHOWN} more (--once --json lists all)"))
    return table


def render_events(state: MonitorState) -> RenderableType:
    table = Table(title="recent events", title_justify="left", show_header=False, box=None)
    table.add_column("time", style="dim", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("peer", no_wrap=True)
    table.add_column("detail")
    events: list[Event] = state.recent_events(EVENTS_SHOWN)
    for ev in reversed(events):
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(ev.time)),
            Text(ev.kind, style=EVENT_STYLES.get(ev.kind, "")),
            Text(ev.short),
            Text(f"{ev.model_id.split('@', 1)[0]} {ev.text}"),
        )
    if not events:
        table.add_row("", "", "", Text("none yet", style="dim"))
    return table
