"""The relay-chain benchmark (the transport half of a hop): rows and the fit, no timing asserts."""

from __future__ import annotations

import pytest

from pymesh.bench import transport_chain


def test_slope_and_fit_rows() -> None:
    assert transport_chain.slope([1, 2, 3], [2.0, 4.0, 6.0]) == pytest.approx(2.0)
    assert transport_chain.slope([2, 2], [1.0, 3.0]) is None
    points = [{"workers": 1, "ms_per_token_p50": 1.0, "cpu_ms_per_token": 2.0},
              {"workers": 3, "ms_per_token_p50": 2.0, "cpu_ms_per_token": 5.0}]
    assert transport_chain.fit_row("quic", points) == {
        "kind": "fit", "transport": "quic", "workers_fitted": [1, 3], "per_hop_ms": 0.5, "cpu_per_hop_ms": 1.5}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["quic", "tcp"])
def test_a_chain_of_two_relays_delivers_every_token(transport: str) -> None:
    row = transport_chain.measure(transport, 2, tokens=10)
    assert row["kind"] == "point" and row["transport"] == transport and row["workers"] == 2
    assert row["ms_per_token_p50"] > 0 and row["cpu_ms_per_token"] > 0
