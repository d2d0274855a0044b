"""Network-namespace NAT topologies: public hosts on a bridge, home LANs behind NAT routers
(used by tests/nat and ``pymesh bench nat``).

Everything lives in namespaces this module creates; the root namespace is never touched (no
interfaces, routes or firewall rules in it: veth pairs are created directly between the
namespaces, and the public bridge lives in its own namespace). Needs root, iproute2 (`ip`) and
nftables (`nft`); `netns_available()` says whether they can be used and, if not, why.

    from pymesh.bench.netns import Topology

    with Topology() as topo:
        boot = topo.add_public_host("bootstrap")          # 10.77.0.10 on the public bridge
        alice = topo.add_home("alice", nat="eim")         # router alice-gw + host alice
        proc = topo.popen("alice", [sys.executable, "-c", "..."], stdout=subprocess.PIPE)
        topo.run("bootstrap", ["ip", "-br", "addr"])
        topo.ip("bootstrap"), alice.public_ip, topo.ip("alice")
    # on exit: every process started with popen() (and anything else still running inside the
    # namespaces) is killed, and the namespaces are deleted.

Layout (N counts homes from 1, in the order they are added):

    public namespace <prefix>-pub: bridge br0, no address
    public host  <prefix>-<name>: eth0 10.77.0.10, .11, ...   (no route to any LAN)
    home router  <prefix>-<home>-gw: wan0 10.77.0.(100+N) on br0; bridge lan0 10.78.N.1/24;
                 ip_forward=1; nftables: masquerade LAN -> wan0, forward only LAN -> WAN and
                 conntrack-established replies, drop every new inbound connection on wan0
    home host    <prefix>-<host>: eth0 10.78.N.(10+i)/24, default route via 10.78.N.1

NAT flavours (`NAT_RULES`), measured by tests/nat/test_topology.py:
- "eim": plain `masquerade`. Linux keeps the socket's source port when the resulting 5-tuple is
  unique, so one socket is seen at the same external (ip, port) by every destination
  (endpoint-independent mapping) unless two LAN sockets collide on a port toward one destination.
- "symmetric": `masquerade fully-random`: every new conntrack entry (a new destination) gets a
  random external port.
Filtering is conntrack's for both: an inbound datagram passes only if it is the reply to an
existing entry, i.e. it comes from the exact (ip, port) the LAN socket sent to
(address-and-port-dependent filtering, a "port-restricted cone" for "eim").
(`masquerade persistent` maps like plain masquerade; `masquerade random` is symmetric too.)

Kernel details that matter (test_topology.py fails if either of the first two is undone):
- The router's input chain must drop new packets on wan0. If it accepted them, the first punch
  datagram reaching a router before its own host has sent would be confirmed by conntrack as an
  inbound entry (peer:port -> router:port); the host's outgoing packet then clashes with it and
  masquerade picks another port, so EIM-to-EIM hole punching fails.
- br_netfilter is loaded here: with bridge-nf-call-iptables=1 (the per-namespace default) bridged
  LAN-to-LAN frames would go through the router's forward chain (policy drop). Set to 0 in the
  router and public namespaces.
- Conntrack is per namespace, with the kernel's UDP timeouts (30 s unreplied, 120 s replied):
  reuse of a (port, destination) within a module sees the earlier entry; `free_port()` avoids it.
- rp_filter is 0 in new namespaces. No netem: no delay or loss emulation here.

Other helpers: `standard_topology()` (bootstrap, relay1, relay2 + alice/bob eim, carol symmetric);
tests/nat/conftest.py has pytest fixtures, tests/nat/udp_tool.py tiny UDP/TCP probes. Names carry a per-process, per-topology prefix (`pmnat<pid>x<seq>`), so parallel runs do not
collide; namespaces left by dead processes (a crashed run) are removed when a Topology starts.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence

log = logging.getLogger(__name__)

PREFIX = "pmnat"
PUBLIC_NET = ipaddress.ip_network("10.77.0.0/24")
LAN_NET_FMT = "10.78.{n}.0/24"
FIRST_PUBLIC_HOST = 10
FIRST_ROUTER = 100
FIRST_LAN_HOST = 10
MAX_HOMES = 150  # routers take 10.77.0.100 .. .249
MAX_PUBLIC_HOSTS = 90  # public hosts take 10.77.0.10 .. .99
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,23}$")

Nat = Literal["eim", "symmetric"]
# The masquerade statement per flavour (see the module docstring and test_topology.py).
NAT_RULES: dict[str, str] = {"eim": "masquerade", "symmetric": "masquerade fully-random"}

_RULESET = """\
table ip pmnat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" {masquerade}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state established,related accept
        iifname "wan0" drop
    }}
}}
"""


class NetnsError(RuntimeError):
    """A namespace command failed; the message names the command and its output."""


@dataclass(frozen=True)
class Host:
    """One namespace. `ip` is the address others use to reach it (a router's public address)."""

    name: str
    ns: str
    ip: str
    role: Literal["public", "router", "home"]
    lan_ip: str | None = None  # routers only: the LAN gateway address
    home: str | None = None  # routers and home hosts: the home's name


@dataclass(frozen=True)
class Home:
    """A NAT router and the hosts behind it."""

    name: str
    nat: Nat
    router: Host
    hosts: tuple[Host, ...]
    lan: str  # e.g. "10.78.1.0/24"

    @property
    def public_ip(self) -> str:
        """The router's public address: what public hosts see as the source of LAN traffic."""
        return self.router.ip

    @property
    def host(self) -> Host:
        """The first (often the only) host behind the router."""
        return self.hosts[0]


def _sh(argv: Sequence[str], *, input: str | None = None, timeout: float = 20.0,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"`{' '.join(argv)}` did not finish within {timeout} s") from e
    if check and res.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed (exit {res.returncode}): "
                         f"{(res.stderr or res.stdout).strip()}")
    return res


@functools.lru_cache(maxsize=1)
def netns_available() -> tuple[bool, str]:
    """(True, "") when namespaces and nftables work here; otherwise (False, why and what to do).

    Probes once per process: creates a namespace, loads an nftables NAT table in it, deletes it.
    """
    if os.geteuid() != 0:
        return False, "network namespaces need root (run as root, as CI does)"
    if shutil.which("ip") is None:
        return False, "iproute2 (`ip`) is not installed (apt-get install iproute2)"
    if shutil.which("nft") is None:
        return False, "nftables (`nft`) is not installed (apt-get install nftables, or scripts/setup.sh as root)"
    probe = f"{PREFIX}{os.getpid()}probe"
    try:
        _sh(["ip", "netns", "add", probe])
    except NetnsError as e:
        return False, f"cannot create a network namespace: {e}"
    try:
        _sh(["ip", "netns", "exec", probe, "nft", "-f", "-"],
            input=_RULESET.format(masquerade=NAT_RULES["symmetric"]))
    except NetnsError as e:
        return False, f"nftables NAT does not work in a namespace (kernel without nf_tables/nf_nat?): {e}"
    finally:
        _sh(["ip", "netns", "del", probe], check=False)
    return True, ""


def _list_namespaces() -> list[str]:
    res = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL whatever still runs inside `ns` (only namespaces this module created get here)."""
    res = _sh(["ip", "netns", "pids", ns], check=False)
    for tok in res.stdout.split():
        try:
            os.kill(int(tok), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def _delete_namespaces(names: Sequence[str]) -> list[str]:
    """Kill processes in and delete each namespace; returns error messages (empty when all went)."""
    errors = []
    for ns in names:
        _kill_namespace_processes(ns)
    for ns in names:
        res = _sh(["ip", "netns", "del", ns], check=False)
        if res.returncode != 0 and ns in _list_namespaces():
            errors.append(f"{ns}: {res.stderr.strip()}")
    return errors


def _pid_running(pid: int) -> bool:
    """False for a pid that is gone or a zombie (a killed run whose parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        return True  # unknown: keep its namespaces
    return state not in ("Z", "X")


def _pid_start_time(pid: int) -> float | None:
    """When `pid` started (epoch seconds), or None if it is not running. (/proc/<pid>'s own
    mtime is not the start time: procfs stamps its inodes when they are looked up.)"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces with this module's prefix whose creating process is gone.

    A namespace is stale when the pid in its name is not running, or was started after the
    namespace was created (the pid was reused). Returns the names removed.
    """
    pat = re.compile(rf"^{PREFIX}(\d+)(?:x|probe)")
    stale = []
    for ns in _list_namespaces():
        m = pat.match(ns)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        if not _pid_running(pid):
            stale.append(ns)
            continue
        started = _pid_start_time(pid)
        try:
            created: float | None = os.stat(f"/run/netns/{ns}").st_mtime  # when `ip netns add` ran
        except OSError:
            created = None
        if started is not None and created is not None and created < started - 1.0:
            stale.append(ns)
    if stale:
        log.warning("removing %d network namespaces left by earlier runs: %s", len(stale), ", ".join(stale))
        _delete_namespaces(stale)
    return stale


_seq_lock = threading.Lock()
_seq = 0
_live: set[Topology] = set()


def _next_prefix() -> str:
    global _seq
    with _seq_lock:
        _seq += 1
        return f"{PREFIX}{os.getpid()}x{_seq}"


@atexit.register
def _cleanup_live_topologies() -> None:  # a test run interrupted between enter and exit
    for topo in list(_live):
        topo.close()


@dataclass(eq=False)
class Topology:
    """A public bridge with hosts and NAT'ed homes; a context manager that removes it all on exit.

    Methods taking `host` accept a `Host` or its name (public host, home host, or "<home>-gw").
    """

    prefix: str = field(default_factory=_next_prefix)
    hosts: dict[str, Host] = field(default_factory=dict, init=False)
    homes: dict[str, Home] = field(default_factory=dict, init=False)
    _namespaces: list[str] = field(default_factory=list, init=False)
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, init=False)
    _ports: int = field(default=0, init=False)
    _open: bool = field(default=False, init=False)

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Topology:
        ok, why = netns_available()
        if not ok:
            raise NetnsError(why)
        remove_stale_namespaces()
        self._open = True
        _live.add(self)
        try:
            self._pub = self._add_ns("pub")
            self._set_bridge_nf_off(self._pub)
            self._ip(self._pub, "link", "add", "br0", "type", "bridge")
            self._ip(self._pub, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process started here and delete every namespace. Safe to call twice."""
        _live.discard(self)
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("process %s in %s did not exit after SIGKILL", proc.pid, self.prefix)
        self._procs.clear()
        errors = _delete_namespaces(list(reversed(self._namespaces)))
        self._namespaces.clear()
        self._open = False
        if errors:
            log.error("could not delete namespaces: %s", "; ".join(errors))

    def namespaces(self) -> list[str]:
        """The namespaces of this topology that exist now (empty after exit)."""
        return [ns for ns in _list_namespaces() if ns.startswith(self.prefix + "-")]

    # ---- building ----------------------------------------------------------------------------
    def add_public_host(self, name: str) -> Host:
        """A host on the public bridge with the next address from 10.77.0.10."""
        n_public = sum(1 for h in self.hosts.values() if h.role == "public")
        if n_public >= MAX_PUBLIC_HOSTS:
            raise NetnsError(f"at most {MAX_PUBLIC_HOSTS} public hosts per topology")
        ip = str(PUBLIC_NET.network_address + FIRST_PUBLIC_HOST + n_public)
        ns = self._new_host_ns(name)
        self._plug_public(ns, "eth0", ip)
        host = Host(name=name, ns=ns, ip=ip, role="public")
        self.hosts[name] = host
        return host

    def add_home(self, name: str, nat: Nat = "eim", hosts: int | Sequence[str] = 1) -> Home:
        """A NAT router `<name>-gw` and its LAN hosts.

        `hosts`: a count (1: one host called `name`; n > 1: `name1` .. `namen`) or the host names.
        `nat`: "eim" (endpoint-independent mapping) or "symmetric" (a new port per destination).
        """
        if nat not in NAT_RULES:
            raise ValueError(f"nat must be one of {sorted(NAT_RULES)}, not {nat!r}")
        if isinstance(hosts, int):
            if hosts < 1:
                raise ValueError(f"a home needs at least one host, not {hosts}")
            host_names = [name] if hosts == 1 else [f"{name}{i}" for i in range(1, hosts + 1)]
        else:
            host_names = list(hosts)
        n = len(self.homes) + 1
        if n > MAX_HOMES:
            raise NetnsError(f"at most {MAX_HOMES} homes per topology")
        lan = ipaddress.ip_network(LAN_NET_FMT.format(n=n))
        gw_ip = str(lan.network_address + 1)
        public_ip = str(PUBLIC_NET.network_address + FIRST_ROUTER + n - 1)

        rns = self._new_host_ns(f"{name}-gw")
        self._set_bridge_nf_off(rns)
        self._plug_public(rns, "wan0", public_ip)
        self._ip(rns, "link", "add", "lan0", "type", "bridge")
        self._ip(rns, "addr", "add", f"{gw_ip}/{lan.prefixlen}", "dev", "lan0")
        self._ip(rns, "link", "set", "lan0", "up")
        self._sysctl(rns, "net.ipv4.ip_forward", "1")
        _sh(["ip", "netns", "exec", rns, "nft", "-f", "-"], input=_RULESET.format(masquerade=NAT_RULES[nat]))
        router = Host(name=f"{name}-gw", ns=rns, ip=public_ip, role="router", lan_ip=gw_ip, home=name)
        self.hosts[router.name] = router

        members = []
        for i, hname in enumerate(host_names):
            hns = self._new_host_ns(hname)
            port = f"h{i}"
            self._ip(hns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", rns)
            self._ip(rns, "link", "set", port, "master", "lan0")
            self._ip(rns, "link", "set", port, "up")
            ip = str(lan.network_address + FIRST_LAN_HOST + i)
            self._ip(hns, "addr", "add", f"{ip}/{lan.prefixlen}", "dev", "eth0")
            self._ip(hns, "link", "set", "eth0", "up")
            self._ip(hns, "route", "add", "default", "via", gw_ip)
            host = Host(name=hname, ns=hns, ip=ip, role="home", home=name)
            self.hosts[hname] = host
            members.append(host)
        home = Home(name=name, nat=nat, router=router, hosts=tuple(members), lan=str(lan))
        self.homes[name] = home
        return home

    # ---- using -------------------------------------------------------------------------------
    def host(self, host: Host | str) -> Host:
        if isinstance(host, Host):
            return host
        try:
            return self.hosts[host]
        except KeyError:
            raise KeyError(f"no host {host!r} in this topology (have: {', '.join(self.hosts)})") from None

    def ip(self, host: Host | str) -> str:
        """The host's address (for a router: its public address)."""
        return self.host(host).ip

    def exec_argv(self, host: Host | str, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed to run inside the host's namespace."""
        return ["ip", "netns", "exec", self.host(host).ns, *argv]

    def popen(self, host: Host | str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start `argv` in the host's namespace (keywords go to subprocess.Popen); killed on exit."""
        self._check_open()
        proc: subprocess.Popen[Any] = subprocess.Popen(self.exec_argv(host, argv), **kw)
        self._procs.append(proc)
        return proc

    def run(self, host: Host | str, argv: Sequence[str], *, timeout: float = 30.0, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a short command in the host's namespace; text output captured; NetnsError if it fails."""
        self._check_open()
        return _sh(self.exec_argv(host, argv), input=input, timeout=timeout, check=check)

    def free_port(self) -> int:
        """A port number not handed out before by this topology (20000, 20001, ...).

        Namespaces start empty, so any port is free; distinct ports keep one test's conntrack
        entries (UDP: 30 s, 120 s once replied) from matching another test's traffic.
        """
        self._ports += 1
        return 20000 + self._ports

    # ---- internals ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if not self._open:
            raise NetnsError("the topology is not open: use it inside `with Topology() as topo:`")

    def _new_host_ns(self, name: str) -> str:
        if not NAME_RE.match(name):
            raise ValueError(f"host name {name!r}: use 1-24 characters a-z, 0-9, '-', starting with a letter")
        if name in self.hosts or name == "pub":
            raise ValueError(f"host name {name!r} is already used in this topology")
        return self._add_ns(name)

    def _add_ns(self, name: str) -> str:
        self._check_open()
        ns = f"{self.prefix}-{name}"
        _sh(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        self._ip(ns, "link", "set", "lo", "up")
        return ns

    def _plug_public(self, ns: str, ifname: str, ip: str) -> None:
        port = f"p{len(self._namespaces)}"
        self._ip(ns, "link", "add", ifname, "type", "veth", "peer", "name", port, "netns", self._pub)
        self._ip(self._pub, "link", "set", port, "master", "br0")
        self._ip(self._pub, "link", "set", port, "up")
        self._ip(ns, "addr", "add", f"{ip}/{PUBLIC_NET.prefixlen}", "dev", ifname)
        self._ip(ns, "link", "set", ifname, "up")

    def _set_bridge_nf_off(self, ns: str) -> None:
        # br_netfilter (loaded on this kernel) would pass bridged LAN-to-LAN frames through the
        # router's ip forward chain, whose policy is drop. It is a per-namespace sysctl.
        if os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"):
            self._sysctl(ns, "net.bridge.bridge-nf-call-iptables", "0")

    @staticmethod
    def _ip(ns: str, *args: str) -> None:
        _sh(["ip", "-n", ns, *args])

    @staticmethod
    def _sysctl(ns: str, key: str, value: str) -> None:
        _sh(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"])


@contextlib.contextmanager
def standard_topology(public: Sequence[str] = ("bootstrap", "relay1", "relay2"),
                      homes: Sequence[tuple[str, Nat]] = (("alice", "eim"), ("bob", "eim"),
                                                          ("carol", "symmetric"))) -> Iterator[Topology]:
    """A Topology with the given public hosts and one-host homes (name, nat), removed on exit."""
    with Topology() as topo:
        for name in public:
            topo.add_public_host(name)
        for name, nat in homes:
            topo.add_home(name, nat)
        yield topo
