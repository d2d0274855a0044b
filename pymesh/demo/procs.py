"""Child-process supervision for local swarms: start, watch, stop without orphans.

Each child runs ``python -m pymesh ...`` in its own session (so its process group is
its pid and a terminal's Ctrl-C reaches only the supervisor, which then shuts the
children down in order), writes its log to a file in the supervisor's work folder, and
on Linux asks the kernel to send it SIGTERM if the supervisor dies without cleaning up
(``PR_SET_PDEATHSIG``). Stopping sends SIGTERM to each child's process group, waits a
grace period, then SIGKILLs whatever is left.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pymesh.errors import PymeshError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class DemoError(PymeshError):
    """A local swarm could not be started or failed while running."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the child itself (not its group); nothing if it has exited."""
        if self.alive():
            self.popen.send_signal(sig)

    def log_text(self) -> str:
        """Everything the child has logged so far ("" before its log exists)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_output(self, needle: str, timeout: float) -> str:
        """Block until ``needle`` appears in the child's log (returns the log so far);
        DemoError if it exits or times out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            if not self.alive():
                raise DemoError(f"{self.name} (pid {self.pid}) exited with status {self.popen.returncode} "
                                f"before printing {needle!r}; its log ends with:\n{self.log_tail()}")
            time.sleep(0.05)
        raise DemoError(f"{self.name} (pid {self.pid}) did not print {needle!r} within {timeout:.0f}s; "
                        f"its log ends with:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) if text else "(no log)"


def pymesh_argv(*args: str) -> list[str]:
    """The command line of a pymesh subcommand run by this Python interpreter."""
    return [sys.executable, "-m", "pymesh", *args]


class Supervisor:
    """Owns a set of child processes; ``with Supervisor(dir) as sup:`` stops them all on exit."""

    def __init__(self, workdir: Path, *, env: dict[str, str] | None = None, grace: float = 8.0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ if env is None else env)
        self.grace = grace
        self.children: list[Child] = []

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def spawn(self, name: str, argv: Sequence[str], *, extra_env: dict[str, str] | None = None) -> Child:
        log_path = self.workdir / f"{name}.log"
        env = dict(self.env)
        env.update(extra_env or {})
        with open(log_path, "wb") as logf:
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        child = Child(name, list(argv), log_path, popen)
        self.children.append(child)
        log.info("started %s (pid %d): %s", name, popen.pid, " ".join(argv))
        return child

    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def check_alive(self) -> None:
        """Raise :class:`DemoError` with the log tail of the first child that exited."""
        for c in self.children:
            code = c.popen.poll()
            if code is not None:
                raise DemoError(
                    f"{c.name} (pid {c.pid}) exited with status {code}; its log "
                    f"{c.log_path} ends with:\n{c.log_tail()}"
                )

    def stop(self, child: Child, grace: float | None = None) -> int | None:
        """SIGTERM the child's process group, SIGKILL after ``grace`` seconds."""
        grace = self.grace if grace is None else grace
        if child.alive():
            _signal_group(child.pid, signal.SIGTERM)
            try:
                child.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0fs; killing it", child.name, child.pid, grace)
        # Whatever is left in the group (the child itself or anything it started) dies now.
        _signal_group(child.pid, signal.SIGKILL)
        try:
            return child.popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) survived SIGKILL", child.name, child.pid)
            return None

    def retire(self, child: Child) -> int | None:
        """Stop one child on purpose: it is no longer watched (its exit is not a failure)."""
        code = self.stop(child)
        if child in self.children:
            self.children.remove(child)
        return code

    def stop_all(self) -> None:
        """Stop the children: all but the first together, then the first.

        The first child is the one the others depend on (a local swarm's bootstrap node):
        workers get SIGTERM at once, so their grace periods overlap, and can still reach
        it to announce that they go offline; it is stopped once they are gone.
        """
        if not self.children:
            return
        first, rest = self.children[0], self.children[1:]
        for c in reversed(rest):
            if c.alive():
                _signal_group(c.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for c in reversed(rest):
            self.stop(c, grace=max(0.1, deadline - time.monotonic()))
        self.stop(first)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def pid_exists(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


#: ports free_port already handed out in this process (a child may not have bound them yet)
_handed_out: set[int] = set()


def free_port(span: int = 2, *, host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port N such that UDP and TCP N..N+span-1 are free on ``host`` right now and were not
    handed out before by this process (span 2: a node's transport port and its DHT port)."""
    import random

    rng = random.Random()
    for _ in range(tries):
        base = rng.randrange(20000, 32000 - span)
        wanted = range(base, base + span)
        if not _handed_out.intersection(wanted) and all(_bindable(host, p) for p in wanted):
            _handed_out.update(wanted)
            return base
    raise DemoError(f"found no {span} consecutive free ports on {host} in 20000-32000")


def _bindable(host: str, port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind((host, port))
        except OSError:
            return False
        finally:
            s.close()
    return True
