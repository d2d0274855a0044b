"""Verified inference: what it costs and what it catches (``pymesh bench verify [--json]``).

Starts a bootstrap node and, for each of ``--workers`` spans of the model (an even split of
the embedded SmolLM2-135M unless ``--model-path``), ``1 + --spares`` honest workers as child
processes on loopback; the span the faulty worker joins later has at least three honest
providers, so a mismatch can be settled by a third one. The client runs in this process
(:class:`pymesh.client.swarm.Swarm` + :func:`pymesh.client.generation.generate_tokens`),
its ``settings.client`` replaced to choose ``verify`` / ``verify_rate``.

a) **Speed**: decode tokens/s of one greedy generation (same prompt, fixed length, EOS
   ignored) with ``--verify off``, ``sample`` (rate ``--verify-rate``, default the
   client's) and ``all``; the modes interleaved in each repeat (rotated order), after one
   warm-up per mode (so ``sample``'s first-step checks of unchecked workers are not in the
   steady-state figure). ``cost`` = 1 - median(mode) / median(off).
b) **Detection**: for each probability p (``--rates``, default 1, 0.1, 0.02) a worker is
   started with ``PYMESH_TEST_FAULTS=1 PYMESH_TEST_CORRUPT=p`` on the faulty span (the
   middle one) and the honest workers of that span are deprioritised (routed around while
   the faulty one is there, still used as checkers). A *trial* is one client (a fresh
   ``Swarm``: nothing checked yet) running sessions of ``n`` tokens until it convicts the
   faulty worker or has run ``--trial-sessions``; at most ``--sessions`` sessions per p
   in all. Per session: was the faulty worker on the route, did the client convict it, after
   how many hop-steps through it (the token count when ``Swarm.convicted`` first names it),
   and which honest workers were convicted (false positives; must be none).
   Predictions (:func:`predicted`), R the verify rate and n the session's hop-steps through
   the faulty worker: each step is sampled with probability R and a check compares every
   step since the previous one, so a session is caught when a corrupted step comes at or
   before its last checked step; the client's first session always checks step 0 through
   an unchecked worker. (Were only the sampled steps compared, it would be 1-(1-pR)^n.)

Rows: ``kind`` "speed" (one per mode), "detection" (one per p) and "session" (one per
session run, for the record).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from pymesh.bench.swarm import CHILD_ENV, even_split, prompt_of
from pymesh.settings import Settings, settings_of

log = logging.getLogger(__name__)

MODES = ("off", "sample", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, metavar="DIR",
                        help="model folder (default: SmolLM2-135M-Instruct from `pymesh model pull`)")
    parser.add_argument("--workers", type=int, default=3, help="spans the model is split into (default 3)")
    parser.add_argument("--spares", type=int, default=1,
                        help="honest spare workers per span (default 1; the faulty span gets at least 2)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens (default 32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per generation (default 64; --quick 16)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved speed repeats (default 3; --quick 1)")
    parser.add_argument("--modes", default=",".join(MODES), help="speed: comma-separated verify modes (off,sample,all)")
    parser.add_argument("--verify-rate", type=float, default=None,
                        help="the sample mode's rate (default: the client's, PYMESH_VERIFY_RATE)")
    parser.add_argument("--extra-rates", default="",
                        help="speed: more sample rates measured beside the modes, comma-separated (e.g. 0,0.02,0.05); "
                             "rate 0 is receipts plus the first-step checks only")
    parser.add_argument("--rates", default="1,0.1,0.02",
                        help="detection: comma-separated corruption probabilities (default 1,0.1,0.02; '' skips)")
    parser.add_argument("--detect-verify", default="sample", choices=MODES,
                        help="detection: the client's verify mode (default sample)")
    parser.add_argument("--corrupt-mode", default="noise", help="the faulty worker's PYMESH_TEST_CORRUPT_MODE")
    parser.add_argument("--sessions", type=int, default=None,
                        help="detection: sessions per probability at most (default 40; --quick 6)")
    parser.add_argument("--trial-sessions", type=int, default=5,
                        help="detection: sessions one client runs before a fresh one (default 5)")
    parser.add_argument("--detect-tokens", type=int, default=None,
                        help="detection: tokens per session (default 32; --quick 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process (default 1)")


# ---- predictions and summaries (pure) ---------------------------------------------------

def predicted(p: float, rate: float, n: int, first: bool) -> float:
    """Probability that a session of ``n`` hop-steps through a worker corrupting each step
    with probability ``p`` is caught when each step is sampled for a check with probability
    ``rate``; ``first``: the client has not checked that worker yet, so step 0 is checked.

    A check at step k compares every step since the previous check (the checker computes
    them in one chunk anyway), so a session is caught when some step at or before its LAST
    checked step K was corrupted: sum over k of P(K = k) (1 - (1-p)^(k+1))."""
    if n <= 0:
        return 0.0
    caught = 0.0
    for k in range(n):
        p_last = rate * (1 - rate) ** (n - 1 - k)           # checked at k, not after
        if first and k == 0:
            p_last = (1 - rate) ** (n - 1)                  # step 0 always checked
        caught += p_last * (1 - (1 - p) ** (k + 1))
    return caught


def mode_of(key: str, rate: float) -> tuple[str, float]:
    """A speed run's key ("off", "sample", "all" or "sample@R") as (verify mode, rate)."""
    if key.startswith("sample@"):
        return "sample", float(key.removeprefix("sample@"))
    return key, {"off": 0.0, "sample": rate, "all": 1.0}[key]


def speed_rows(runs: dict[str, list[dict[str, Any]]], rate: float) -> list[dict[str, Any]]:
    """One row per verify mode (and extra sample rate) from its runs ({tokens_per_s, checks, ...} each)."""
    rows = []
    base = statistics.median(r["tokens_per_s"] for r in runs["off"]) if runs.get("off") else None
    keys = [m for m in MODES if m in runs] + sorted((k for k in runs if k not in MODES), key=lambda k: mode_of(k, rate)[1])
    for key in keys:
        got = runs.get(key)
        if not got:
            continue
        mode, mode_rate = mode_of(key, rate)
        rates = [r["tokens_per_s"] for r in got]
        med = statistics.median(rates)
        rows.append({"kind": "speed", "verify": mode,
                     "rate": mode_rate,
                     "tokens_per_s": round(med, 2), "tokens_per_s_min": round(min(rates), 2),
                     "tokens_per_s_max": round(max(rates), 2), "runs": len(got),
                     "cost": round(1 - med / base, 4) if base else None,
                     "checks": sum(r["checks"] for r in got), "mismatches": sum(r["mismatches"] for r in got),
                     "convicted": sum(len(r["convicted"]) for r in got),
                     "disagreements": sum(int(r.get("disagreements", 0)) for r in got),
                     "errors": [r["error"] for r in got if r.get("error")]})
    return rows


def _frac(hits: int, total: int) -> float | None:
    return round(hits / total, 4) if total else None


def detection_row(p: float, rate: float, n: int, sessions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Measured against predicted detection for one corruption probability ``p``."""
    through = [s for s in sessions if s["through_bad"]]
    first = [s for s in through if s["session"] == 1]
    later = [s for s in through if s["session"] > 1]
    caught = [s for s in through if s["convicted"]]
    steps = [s["steps"] for s in caught]
    return {
        "kind": "detection", "p": p, "rate": rate, "tokens": n,
        "trials": len({s["trial"] for s in sessions}), "sessions": len(sessions),
        "sessions_through_bad": len(through),
        "first_sessions": len(first),
        "first_detected": _frac(sum(s["convicted"] for s in first), len(first)),
        "first_predicted": round(predicted(p, rate, n, True), 4),
        "later_sessions": len(later),
        "later_detected": _frac(sum(s["convicted"] for s in later), len(later)),
        "later_predicted": round(predicted(p, rate, n, False), 4),
        "trials_convicting": len({s["trial"] for s in caught}),
        "steps_to_detection_mean": round(statistics.mean(steps), 2) if steps else None,
        "steps_to_detection_max": max(steps) if steps else None,
        "false_positives": sum(len(s["false_positives"]) for s in sessions),
        "checks": sum(s["checks"] for s in sessions), "mismatches": sum(s["mismatches"] for s in sessions),
        "unverified_sessions": sum(bool(s["unverified"]) for s in sessions),
        # unsettled disagreements (no third provider, or it agreed with neither): nobody banned
        "disagreements": sum(int(s.get("disagreements", 0)) for s in sessions),
        "errors": sum(bool(s.get("error")) for s in sessions),
    }


def report_of(stats: Any) -> dict[str, Any]:
    """``stats.verification`` as a dict (a report object's ``to_json()``, a dict, or nothing)."""
    v = getattr(stats, "verification", None)
    if v is None:
        return {}
    if hasattr(v, "to_json"):
        return dict(v.to_json())
    return dict(v) if isinstance(v, dict) else {}


def convicted_peers(report: dict[str, Any]) -> list[str]:
    """Peer texts a report's ``convicted`` names (entries are peer texts or {"peer": ...})."""
    out = []
    for c in report.get("convicted") or []:
        peer = c.get("peer") if isinstance(c, dict) else c
        if isinstance(peer, str):
            out.append(peer)
    return out


def with_verify(settings: Settings, mode: str, rate: float) -> Settings:
    return dataclasses.replace(settings, client=dataclasses.replace(settings.client, verify=mode, verify_rate=rate))


# ---- the client's runs (in this process) ------------------------------------------------

async def one_generation(swarm: Any, model: Any, ids: list[int], n: int, watch: Any = None) -> dict[str, Any]:
    """One greedy generation of ``n`` tokens; ``watch``: a peer whose conviction to time
    (the token count when ``swarm.convicted`` first names it)."""
    from pymesh.client.generation import GenerationStats, generate_tokens
    from pymesh.errors import PymeshError
    from pymesh.model.sampling import SamplingParams

    stats = GenerationStats()
    first_route: list[str] = []
    detected_at = None
    count = 0
    error = None
    t0 = time.perf_counter()
    try:
        async for _ in generate_tokens(swarm, model, ids, SamplingParams(max_new_tokens=n), stats=stats,
                                       ignore_eos=True, rewind=lambda keep: None):
            count += 1
            if count == 1:
                # the route the session opened with: the live one, plus any hop a recovery
                # (a conviction at the first step included) replaced before this token
                first_route = [r["peer"] for r in stats.route] + [r["blamed"] for r in stats.recoveries]
            if watch is not None and detected_at is None and watch in swarm.convicted:
                detected_at = count
    except PymeshError as exc:  # e.g. a late conviction retracting emitted tokens
        error = f"{type(exc).__name__}: {exc}"
    report = report_of(stats)
    if watch is not None and detected_at is None and watch in swarm.convicted:
        detected_at = max(count, 1)  # convicted while the session settled its background checks
    return {"tokens": count, "tokens_per_s": stats.decode_tokens_per_s, "seconds": time.perf_counter() - t0,
            "first_route": first_route, "detected_at": detected_at, "report": report,
            "checks": int(report.get("checks", 0) or 0), "mismatches": int(report.get("mismatches", 0) or 0),
            "convicted": convicted_peers(report), "unverified": bool(report.get("unverified")),
            "disagreements": len(report.get("disagreements") or []), "error": error}


async def speed_runs(bootstrap: str, model: Any, ids: list[int], n: int, repeats: int, modes: list[str],
                     settings: Settings, rate: float, progress: Any, task: Any) -> dict[str, list[dict[str, Any]]]:
    from pymesh.client.swarm import Swarm

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    async with Swarm([bootstrap], model.model_id, settings=settings) as swarm:
        for mode in modes:  # warm-up: routes, and sample's first checks of each worker
            swarm.settings = with_verify(settings, *mode_of(mode, rate))
            await one_generation(swarm, model, ids, min(n, 8))
        for r in range(repeats):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for mode in order:
                progress.update(task, description=f"speed: verify {mode}, repeat {r + 1}/{repeats}")
                swarm.settings = with_verify(settings, *mode_of(mode, rate))
                runs[mode].append(await one_generation(swarm, model, ids, n))
                progress.advance(task)
    return runs


async def detection_runs(bootstrap: str, model: Any, ids: list[int], n: int, settings: Settings, bad: str,
                         spare_peers: list[str], max_sessions: int, per_trial: int, progress: Any, task: Any
                         ) -> list[dict[str, Any]]:
    """Sessions through the faulty worker ``bad`` (peer text), fresh clients per trial."""
    from pymesh.client.swarm import Swarm
    from pymesh.proto.identity import PeerID

    bad_id = PeerID.from_text(bad)
    spares = [PeerID.from_text(s) for s in spare_peers]
    out: list[dict[str, Any]] = []
    trial = 0
    while len(out) < max_sessions:
        trial += 1
        async with Swarm([bootstrap], model.model_id, settings=settings) as swarm:
            for session in range(1, per_trial + 1):
                if len(out) >= max_sessions:
                    break
                for s in spares:  # penalties expire: renew them before each session
                    swarm.deprioritise(s, "bench verify: route through the faulty worker")
                got = await one_generation(swarm, model, ids, n, watch=bad_id)
                through = bad in got["first_route"]
                convicted = got["detected_at"] is not None
                out.append({"kind": "session", "trial": trial, "session": session, "through_bad": through,
                            "convicted": convicted, "steps": got["detected_at"] if convicted else got["tokens"],
                            "false_positives": [p for p in got["convicted"] if p != bad],
                            "checks": got["checks"], "mismatches": got["mismatches"],
                            "unverified": got["unverified"], "disagreements": got["disagreements"],
                            "error": got["error"]})
                progress.advance(task)
                if convicted:
                    break
                if not through:
                    log.warning("bench verify: session %d of trial %d did not route through the faulty worker",
                                session, trial)
    return out


# ---- orchestration ----------------------------------------------------------------------

def run_rows(args: argparse.Namespace, progress: Any) -> list[dict[str, Any]]:
    import trio

    from pymesh.client.generation import ClientModel
    from pymesh.demo.procs import Supervisor, free_port, pymesh_argv
    from pymesh.model.config import load_config
    from pymesh.model.torch_setup import configure_threads
    from pymesh.proto.identity import Identity

    settings = settings_of(args)
    quick = getattr(args, "quick", False)
    n = args.new_tokens or (16 if quick else 64)
    n_detect = args.detect_tokens or (16 if quick else 32)
    repeats = args.repeats or (1 if quick else 3)
    max_sessions = args.sessions or (6 if quick else 40)
    rate = settings.client.verify_rate if args.verify_rate is None else args.verify_rate
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        raise SystemExit(f"bench verify: --modes takes {', '.join(MODES)}")
    modes += [f"sample@{float(x)}" for x in args.extra_rates.split(",") if x.strip()]
    probs = [float(x) for x in args.rates.split(",") if x.strip()]
    if args.model_path:
        model_dir = Path(args.model_path)
    else:
        from pymesh.model.pull import pull_default_model

        model_dir = pull_default_model(progress=True, root=settings.runtime.cache_root(),
                                       gguf=settings.runtime.smollm2_gguf)
    configure_threads(args.threads)
    model = ClientModel(model_dir)
    ids = prompt_of(model.tokenizer, args.prompt_tokens)
    spans = even_split(load_config(model_dir).num_hidden_layers, args.workers)
    faulty = len(spans) // 2
    task = progress.add_task("bench verify", total=1 + repeats * len(modes) + len(probs) * max_sessions)
    env = {**CHILD_ENV, "PYMESH_THREADS": str(args.threads), "PYMESH_SKIP_THROUGHPUT": "1"}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pymesh-bench-verify-") as tmp, Supervisor(Path(tmp)) as sup:
        sup.env.update({**env, "PYMESH_HOME": tmp})
        bport = free_port()
        bootstrap = f"127.0.0.1:{bport}"

        def worker(name: str, span: tuple[int, int], extra: dict[str, str] | None = None) -> tuple[Any, str]:
            key = Path(tmp) / f"{name}.key"
            peer = Identity.load_or_create(str(key)).peer_id.to_text()
            child = sup.spawn(name, pymesh_argv(
                "worker", "--bootstrap", bootstrap, "--host", "127.0.0.1", "--port", str(free_port()),
                "--layers", f"{span[0]}-{span[1] - 1}", "--model-path", str(model_dir), "--identity", str(key),
                "--threads", str(args.threads)), extra_env=extra)
            return child, peer

        progress.update(task, description="starting a bootstrap and the honest workers")
        boot = sup.spawn("bootstrap", pymesh_argv("bootstrap", "--host", "127.0.0.1", "--port", str(bport)))
        boot.wait_for_output("bootstrap address", 60)
        honest: list[tuple[int, Any, str]] = []
        for i, span in enumerate(spans):
            copies = 1 + max(args.spares, 2 if i == faulty and probs else 0)
            honest += [(i, *worker(f"w{i}-{c}", span)) for c in range(copies)]
        for _, child, _ in honest:
            child.wait_for_output("Worker bootstrapped", 180)
        progress.advance(task)
        if modes:
            runs = trio.run(speed_runs, bootstrap, model, ids, n, repeats, modes, settings, rate, progress, task)
            rows += speed_rows(runs, rate)
        detect = with_verify(settings, args.detect_verify, rate)
        r_eff = {"off": 0.0, "sample": rate, "all": 1.0}[args.detect_verify]
        spare_peers = [peer for i, _, peer in honest if i == faulty]
        for k, p in enumerate(probs):
            progress.update(task, description=f"detection: p={p:g}, starting the faulty worker")
            bad, bad_peer = worker(f"faulty{k}", spans[faulty], {
                "PYMESH_TEST_FAULTS": "1", "PYMESH_TEST_CORRUPT": f"{p:g}",
                "PYMESH_TEST_CORRUPT_MODE": args.corrupt_mode, "PYMESH_TEST_CORRUPT_SEED": str(k)})
            bad.wait_for_output("Worker bootstrapped", 180)
            progress.update(task, description=f"detection: p={p:g}, up to {max_sessions} sessions of {n_detect} tokens")
            sessions = trio.run(detection_runs, bootstrap, model, ids, n_detect, detect, bad_peer, spare_peers,
                                max_sessions, args.trial_sessions, progress, task)
            sup.stop(bad)
            # a stopped worker's record may outlive it for a moment; let it expire from the DHT
            time.sleep(float(CHILD_ENV["PYMESH_RECORD_TTL"]) if k + 1 < len(probs) else 0)
            rows.append(detection_row(p, r_eff, n_detect, sessions))
            rows += [{"p": p, **s} for s in sessions]
    log.info("threads per process: %d; prompt %d tokens; %d new tokens; verify rate %g", args.threads, len(ids),
             n, rate)
    return rows


def render(rows: list[dict[str, Any]]) -> Any:
    from rich.console import Group
    from rich.table import Table

    speed = Table(title="verified inference: decode tokens/s by --verify (local swarm with spares, interleaved)")
    for col in ("verify", "rate", "tok/s (median)", "spread", "cost vs off", "checks", "convicted", "unsettled"):
        speed.add_column(col, justify="left" if col == "verify" else "right")
    for r in rows:
        if r.get("kind") == "speed":
            speed.add_row(r["verify"], f"{r['rate']:g}", f"{r['tokens_per_s']:.1f}",
                          f"{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}",
                          "-" if r["cost"] is None else f"{100 * r['cost']:.1f}%", str(r["checks"]),
                          str(r["convicted"]), str(r.get("disagreements", 0)))
    det = Table(title="detection of a corrupting worker: measured vs predicted (a check covers every step since the "
                      "previous one; first session: step 0 checked)")
    for col in ("p", "R", "n", "sessions", "first: measured", "first: predicted", "later: measured",
                "later: predicted", "steps to detection (mean/max)", "false positives", "unsettled"):
        det.add_column(col, justify="right")

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.0f}%"

    for r in rows:
        if r.get("kind") == "detection":
            det.add_row(f"{r['p']:g}", f"{r['rate']:g}", str(r["tokens"]), f"{r['sessions_through_bad']}/{r['sessions']}",
                        f"{pct(r['first_detected'])} of {r['first_sessions']}", pct(r["first_predicted"]),
                        f"{pct(r['later_detected'])} of {r['later_sessions']}", pct(r["later_predicted"]),
                        "-" if r["steps_to_detection_mean"] is None else
                        f"{r['steps_to_detection_mean']:g}/{r['steps_to_detection_max']}",
                        str(r["false_positives"]), str(r.get("disagreements", 0)))
    return Group(speed, det)
