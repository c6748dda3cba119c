"""Loopback ports for embedded servers come from below the ephemeral range, where client sockets never land."""

from __future__ import annotations

import socket

import pytest

from podsweep import embedded


def test_free_port_is_below_the_ephemeral_range_and_bindable() -> None:
    low = embedded._ephemeral_low()
    ports = {embedded.free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports)
    assert len(ports) > 1  # chosen at random: concurrent test processes rarely pick the same one
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_taken_port_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", embedded.free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        real = embedded.random.randrange
        offered: list[int] = []

        def randrange(start: int, stop: int) -> int:
            offered.append(port if len(offered) < 2 else real(start, stop))
            return offered[-1]

        monkeypatch.setattr(embedded.random, "randrange", randrange)
        assert embedded.free_port() != port
        assert offered[:2] == [port, port]


@pytest.mark.parametrize(
    ("last", "free", "expected"),
    [
        pytest.param(None, set(), 20000, id="first-start-picks-a-new-port"),
        pytest.param(14222, {14222}, 14222, id="last-port-free-is-reused"),
        pytest.param(14222, set(), 20000, id="last-port-taken-picks-a-new-one"),
        pytest.param(80, {80}, 20000, id="privileged-port-never-reused"),
        pytest.param(70000, {70000}, 20000, id="impossible-port-never-reused"),
    ],
)
def test_a_restart_reuses_the_last_port_when_it_is_free(last: int | None, free: set[int], expected: int) -> None:
    assert embedded.choose_port(last, lambda port: port in free, lambda: 20000) == expected
