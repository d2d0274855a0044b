"""The client's Swarm and session timing without sockets: bans, discovery deadlines and
liveness probes on trio's virtual clock; pushes parsed before they reach a session."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Sequence

import pytest
import torch
import trio
import trio.testing

from pymesh.client.routing import NoRouteError, SpanOption
from pymesh.client.session import InferenceSession, SessionFailed
from pymesh.client.swarm import Request, Swarm
from pymesh.errors import ConfigError, PeerUnavailable
from pymesh.proto import session_wire as sw
from pymesh.proto.frames import Meta, TensorBlob
from pymesh.proto.identity import PeerID
from pymesh.proto.records import WorkerRecord
from pymesh.proto.vocab import Transport, WorkerState
from pymesh.settings import ClientSettings, Settings
from tests.client.sim import FakeDHT

BOOT = ["127.0.0.1:9"]


def peer(n: int) -> PeerID:
    return PeerID(bytes([n]) * 32)


def virtual(fn: Any) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def settings(**client: Any) -> Settings:
    return Settings(client=ClientSettings(**client))


class OfflineSwarm(Swarm):
    """A Swarm whose DHT answers with fixed records and whose RTTs are known."""

    def __init__(self, records: Sequence[WorkerRecord], **kw: Any) -> None:
        super().__init__(BOOT, "m", **kw)
        self._records = list(records)
        self.reads = FakeDHT(lambda block: list(self._records))
        self._dht = self.reads  # type: ignore[assignment]

    @property
    def lookups(self) -> int:
        return len(self.reads.reads)

    async def measure_rtts(self, options: Sequence[SpanOption]) -> None:
        return None


def record(n: int, start: int, stop: int, *, state: WorkerState = WorkerState.ONLINE,
           transports: tuple[str, ...] = ("quic", "tcp")) -> WorkerRecord:
    return WorkerRecord(peer_id=peer(n), model_id="m", start=start, stop=stop, host="127.0.0.1", port=1000 + n,
                        transports=transports, state=state)


def test_settings_reach_the_swarm_and_bad_transport_is_a_config_error() -> None:
    s = Swarm(BOOT, "m", transport="tcp", settings=settings(ban_seconds=7.0, rpc_timeout=2.5))
    assert (s.ban_seconds, s.rpc_timeout, s.transport) == (7.0, 2.5, Transport.TCP)
    assert Swarm(BOOT, "m").settings == Settings()
    with pytest.raises(ConfigError, match="choose quic or tcp"):
        Swarm(BOOT, "m", transport="udp")


def test_bans_expire_after_ban_seconds_of_virtual_time() -> None:
    async def main() -> None:
        s = Swarm(BOOT, "m", settings=settings(ban_seconds=60.0))
        s.ban(peer(1), "test")
        await trio.sleep(59)
        assert s.current_bans() == {peer(1)}
        await trio.sleep(2)
        assert s.current_bans() == set() and s.banned == {}

    virtual(main)


def test_options_skip_workers_not_online_or_on_another_transport() -> None:
    s = Swarm(BOOT, "m", transport="tcp")
    recs = [record(1, 0, 2), record(2, 0, 2, state=WorkerState.JOINING),
            record(3, 0, 2, transports=("quic",)), record(4, 2, 4, state=WorkerState.OFFLINE)]
    opts = s.options_from(recs)
    assert [o.peer for o in opts] == [peer(1)]
    assert opts[0].transports == (Transport.QUIC, Transport.TCP)


def test_discovery_gives_up_after_its_timeout_naming_the_layer() -> None:
    async def main() -> None:
        s = OfflineSwarm([record(1, 0, 2)], settings=settings(discovery_timeout=20.0))
        t0 = trio.current_time()
        with pytest.raises(NoRouteError, match="no worker serves layer 2") as info:
            await s.find_route(0, 4)
        waited = trio.current_time() - t0
        assert 18 <= waited <= 20 and s.lookups > 5
        assert info.value.missing_block == 2 and "gave up after 20 s" in str(info.value)

    virtual(main)


class _Conn:
    def __init__(self, n: int) -> None:
        self.peer = peer(n)


class _Sink:
    def __init__(self) -> None:
        self.outs: list[sw.Out] = []
        self.errs: list[sw.Err] = []

    def on_out(self, peer: PeerID, out: sw.Out, tensors: list[TensorBlob]) -> None:
        self.outs.append(out)

    def on_err(self, peer: PeerID, err: sw.Err) -> None:
        self.errs.append(err)


def test_pushes_are_parsed_and_malformed_ones_dropped() -> None:
    from pymesh.model.blobs import tensor_to_blob

    async def main() -> None:
        s = Swarm(BOOT, "m")
        sink = _Sink()
        s.sinks[b"sid"] = sink
        conn: Any = _Conn(1)
        blob = tensor_to_blob(torch.zeros(1, 1, 4))
        good = sw.Out(b"sid", 3, (3,), True, 0, 2)
        await s._on_out(conn, good.to_meta(), [blob])
        await s._on_out(conn, {**good.to_meta(), "steps": [3, 4]}, [blob])       # tensor count is wrong
        await s._on_out(conn, {**good.to_meta(), "final": b"yes"}, [blob])       # wrong type
        await s._on_out(conn, sw.Out(b"other", 3, (3,), True, 0, 2).to_meta(), [blob])  # no such session
        err = sw.Err(b"sid", 3, sw.ErrorCode.NEXT_UNREACHABLE, "gone", 0, 2, blame=peer(2))
        await s._on_err(conn, err.to_meta(), [])
        await s._on_err(conn, {**err.to_meta(), "code": "nonsense"}, [])
        await s._on_err(conn, {**err.to_meta(), "blame": b"short"}, [])
        assert sink.outs == [good] and sink.errs == [err]

    trio.run(main)


class _SilentSecondHop(Swarm):
    """Steps vanish; the first hop answers probes, the second does not."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(BOOT, "m", **kw)
        self.probes: list[tuple[float, PeerID]] = []

    async def connect(self, option: SpanOption) -> Any:
        async def push(topic: str, meta: Meta, tensors: Sequence[TensorBlob]) -> None:
            return None
        return SimpleNamespace(push=push)

    async def request(self, option: SpanOption, message: Request, tensors: Sequence[TensorBlob] = (),
                      *, timeout: float | None = None) -> tuple[Meta, list[TensorBlob]]:
        if isinstance(message, sw.CheckLink):  # the link is fine (the hop is what went silent)
            if option.peer == peer(1):
                return sw.CheckLinkReply(True, "").to_meta(), []
            await trio.sleep(timeout or 0)
            raise PeerUnavailable("no answer")
        assert isinstance(message, sw.Info)
        self.probes.append((trio.current_time(), option.peer))
        if option.peer == peer(2):
            await trio.sleep(timeout or 0)
            raise PeerUnavailable("no answer")
        return {}, []


def test_a_hop_that_stops_answering_probes_fails_the_step_after_probe_after() -> None:
    async def main() -> None:
        swarm = _SilentSecondHop(settings=settings(probe_after=2.0, probe_timeout=3.0, step_timeout=60.0,
                                                   max_recoveries=0))
        session = InferenceSession(swarm, 0, 4, max_tokens=8)
        session.route = [SpanOption(peer(1), 0, 2, "h", 1), SpanOption(peer(2), 2, 4, "h", 2)]
        t0 = trio.current_time()
        with pytest.raises(SessionFailed, match=r"step 0 failed 1 times; last: .*\[2-3\] stopped answering"):
            await session.step(torch.zeros(1, 1, 4))
        # one probe round after probe_after, failing after probe_timeout; not the step timeout
        assert trio.current_time() - t0 == pytest.approx(5.0)
        assert sorted(p for _, p in swarm.probes) == [peer(1), peer(2)]
        assert all(t - t0 == pytest.approx(2.0) for t, _ in swarm.probes)

    virtual(main)


def test_records_showing_no_free_cache_are_a_preference_not_a_wall() -> None:
    """A record is a snapshot from the worker's last heartbeat: with room on another worker
    the full one is avoided; with none anywhere the route is tried anyway (a worker that
    really is full refuses the session) instead of failing at the discovery timeout."""
    import dataclasses

    def full(n: int, start: int, stop: int, free: int) -> WorkerRecord:
        return dataclasses.replace(record(n, start, stop), cache_tokens_free=free, cache_tokens_total=2000)

    async def main() -> None:
        s = OfflineSwarm([full(1, 0, 2, 0), full(2, 0, 2, 500), full(3, 2, 4, 500)],
                         settings=settings(discovery_timeout=5.0))
        assert [o.peer for o in await s.find_route(0, 4, min_cache_tokens=100)] == [peer(2), peer(3)]
        s2 = OfflineSwarm([full(1, 0, 2, 0), full(3, 2, 4, 500)], settings=settings(discovery_timeout=5.0))
        t0 = trio.current_time()
        assert [o.peer for o in await s2.find_route(0, 4, min_cache_tokens=100)] == [peer(1), peer(3)]
        assert trio.current_time() - t0 < 1.0
        # a layer nobody serves still fails, naming it
        s3 = OfflineSwarm([full(1, 0, 2, 0)], settings=settings(discovery_timeout=5.0))
        with pytest.raises(NoRouteError, match="layer 2"):
            await s3.find_route(0, 4, min_cache_tokens=100)

    virtual(main)
