"""A local swarm on loopback: one bootstrap node and N workers as child processes.

Used by ``pymesh demo`` and by tests. Identity keys are created here, in the swarm's
temporary folder, before each child starts, so the peer IDs are known up front and
the swarm can wait for each worker's own record to appear in the DHT.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pymesh.demo.observer import Observer
from pymesh.demo.procs import Child, DemoError, Supervisor, free_port, pymesh_argv
from pymesh.proto.allowlist import PeerAllowlist, allowed
from pymesh.proto.identity import Identity, PeerID
from pymesh.proto.records import WorkerRecord
from pymesh.proto.vocab import Transport, WorkerState
from pymesh.settings import Settings

log = logging.getLogger(__name__)

#: Short record TTL and heartbeat for a local swarm, so changes show within seconds.
LOCAL_ENV = {
    "PYMESH_RECORD_TTL": "30",
    "PYMESH_HEARTBEAT": "5",
    "OMP_WAIT_POLICY": "PASSIVE",
}


@dataclass
class WorkerProc:
    name: str
    peer_id: PeerID
    port: int
    child: Child
    layers: tuple[int, int] | None      # inclusive, as on the command line; None = automatic


def model_matches(model_id: str, wanted: str) -> bool:
    """``wanted`` is an exact id or a bare name matching ``name@fingerprint``."""
    return model_id == wanted or model_id.split("@", 1)[0] == wanted.split("@", 1)[0]


def covered_blocks(records: Sequence[WorkerRecord], model: str, num_blocks: int) -> list[bool]:
    """Per block: whether an online record of ``model`` serves it."""
    cover = [False] * num_blocks
    for r in records:
        if r.state == WorkerState.ONLINE and model_matches(str(r.model_id), model):
            for b in range(max(0, r.start), min(num_blocks, r.stop)):
                cover[b] = True
    return cover


class LocalSwarm:
    """``with LocalSwarm(...) as swarm:`` — everything it started is stopped on exit."""

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        grace: float = 8.0,
        keep_workdir: bool = False,
        settings: Settings | None = None,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="pymesh-swarm-")) if workdir is None else Path(workdir)
        self.host = host
        self.settings = settings or Settings()   # for this process's observer node
        full_env = dict(os.environ)
        full_env.update(LOCAL_ENV)
        full_env.update(env or {})
        self.sup = Supervisor(self.workdir, env=full_env, grace=grace)
        self.keep_workdir = keep_workdir
        self.bootstrap_port: int | None = None
        self.bootstrap_peer: PeerID | None = None
        self.workers: list[WorkerProc] = []
        self._observer: Observer | None = None
        #: set by :meth:`make_private`: workers get ``--allow-peers``, records of others are ignored
        self.allow_peers: PeerAllowlist | None = None
        self.allow_file: Path | None = None

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._observer is not None:
            self._observer.close()
            self._observer = None
        self.sup.stop_all()
        if self._own_dir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- starting ---------------------------------------------------------------------
    def _identity(self, name: str) -> tuple[Path, PeerID]:
        """The key of node ``name``: made here on first use (kept for a restart, or made
        ahead of time by :meth:`make_private`)."""
        path = self.workdir / f"{name}.key"
        ident = Identity.load(path) if path.exists() else Identity.generate()
        if not path.exists():
            ident.save(path, exist_ok=False)
        return path, ident.peer_id

    def identity(self, name: str) -> Identity:
        """The identity of node ``name`` (e.g. the in-process client of a private swarm)."""
        return Identity.load(self._identity(name)[0])

    def make_private(self, names: Sequence[str], extra: PeerAllowlist | None = None) -> PeerAllowlist:
        """A private swarm: keys for ``names`` (workers ``worker0``..., the ``client``) are made
        now and, with the peers of ``extra``, listed in ``allow-peers.txt``, which every worker
        started afterwards gets as ``--allow-peers``; :meth:`records` ignores other signers."""
        peers = [self._identity(n)[1] for n in names]
        allow = PeerAllowlist.of([*peers, *(extra or ())])
        self.allow_file = self.workdir / "allow-peers.txt"
        self.allow_file.write_text("".join(f"{p}\n" for p in allow), encoding="utf-8")
        self.allow_peers = allow
        return allow

    @property
    def bootstrap_addr(self) -> str:
        if self.bootstrap_port is None:
            raise DemoError("the bootstrap node has not been started")
        return f"{self.host}:{self.bootstrap_port}"

    @property
    def bootstrap_multiaddr(self) -> str:
        suffix = f"/p2p/{self.bootstrap_peer}" if self.bootstrap_peer is not None else ""
        return f"/ip4/{self.host}/udp/{self.bootstrap_port}{suffix}"

    def start_bootstrap(self) -> str:
        key, peer = self._identity("bootstrap")
        port = free_port(1, host=self.host)
        child = self.sup.spawn("bootstrap", pymesh_argv(
            "bootstrap", "--port", str(port), "--host", self.host, "--identity", str(key)))
        self.bootstrap_port, self.bootstrap_peer = port, peer
        # Nodes that start before the bootstrap answers back off for a while: wait for it.
        child.wait_for_output("bootstrap address", timeout=60.0)
        return self.bootstrap_addr

    def start_worker(
        self,
        *,
        model_path: Path | None = None,
        model_name: str | None = None,
        layers: tuple[int, int] | None = None,
        transport: str = Transport.QUIC,
        extra_args: Sequence[str] = (),
    ) -> WorkerProc:
        name = f"worker{len(self.workers)}"
        key, peer = self._identity(name)
        port = free_port(2, host=self.host)  # transport port N, DHT port N+1
        argv = ["worker", "--bootstrap", self.bootstrap_addr, "--port", str(port),
                "--identity", str(key), "--transport", str(transport)]
        if self.host != "0.0.0.0":
            argv += ["--announce-addr", self.host]
        if model_path is not None:
            argv += ["--model-path", str(model_path)]
        if model_name is not None:
            argv += ["--model-name", model_name]
        if layers is not None:
            argv += ["--layers", f"{layers[0]}-{layers[1]}"]
        if self.allow_file is not None:
            argv += ["--allow-peers", str(self.allow_file)]
        argv += list(extra_args)
        child = self.sup.spawn(name, pymesh_argv(*argv))
        proc = WorkerProc(name, peer, port, child, layers)
        self.workers.append(proc)
        return proc

    def stop_worker(self, proc: WorkerProc) -> None:
        """Stop one worker (SIGTERM: it announces offline) and forget it."""
        self.sup.retire(proc.child)
        if proc in self.workers:
            self.workers.remove(proc)

    # ---- watching the DHT ---------------------------------------------------------------
    def observer(self) -> Observer:
        """The swarm's own DHT node (started on first use, stopped by :meth:`close`)."""
        if self._observer is None:
            from pymesh.proto.addr import parse_addr

            obs = Observer(parse_addr(self.bootstrap_addr), host=self.host, settings=self.settings)
            obs.start()
            self._observer = obs
        return self._observer

    def records(self, timeout: float = 10.0) -> list[WorkerRecord]:
        """Every worker record in the DHT right now (empty if the lookup timed out)."""
        return self._listed(self.observer().list_records(timeout) or [])

    def _listed(self, records: list[WorkerRecord]) -> list[WorkerRecord]:
        return [r for r in records if allowed(self.allow_peers, r.peer_id)]

    def wait_until(
        self,
        done: Callable[[list[WorkerRecord]], bool],
        *,
        timeout: float,
        what: str,
        on_poll: Callable[[list[WorkerRecord]], None] | None = None,
        interval: float = 0.5,
        poll_timeout: float = 10.0,
    ) -> list[WorkerRecord]:
        """Poll every worker record until ``done(records)``; children must stay alive."""
        deadline = time.monotonic() + timeout
        records: list[WorkerRecord] = []
        while time.monotonic() < deadline:
            self.sup.check_alive()
            got = self.observer().list_records(min(poll_timeout, max(0.1, deadline - time.monotonic())))
            if got is not None:
                records = self._listed(got)
            if on_poll is not None:
                on_poll(records)
            if done(records):
                return records
            time.sleep(interval)
        self.sup.check_alive()
        raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}; logs are in {self.workdir}")

    def wait_for_workers(self, procs: Sequence[WorkerProc], *, timeout: float) -> list[WorkerRecord]:
        """Until each of ``procs`` has an online record."""
        want = {p.peer_id for p in procs}

        def done(records: list[WorkerRecord]) -> bool:
            return want <= {r.peer_id for r in records if r.state == WorkerState.ONLINE}

        names = ", ".join(p.name for p in procs)
        return self.wait_until(done, timeout=timeout, what=f"{names} to announce")

    def wait_for_coverage(
        self,
        model: str,
        num_blocks: int,
        *,
        timeout: float,
        on_poll: Callable[[list[WorkerRecord]], None] | None = None,
    ) -> list[WorkerRecord]:
        """Until online records of ``model`` cover blocks 0..num_blocks-1."""
        return self.wait_until(
            lambda recs: all(covered_blocks(recs, model, num_blocks)),
            timeout=timeout, what=f"all {num_blocks} blocks of {model} to be served", on_poll=on_poll,
        )
