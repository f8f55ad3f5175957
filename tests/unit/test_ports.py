"""Ports for started processes: below the kernel's ephemeral range, never twice (workers/ports.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from workers import ports
from workers.ports import DEFAULT_EPHEMERAL_LOW, SPAN, ephemeral_low, free_port


def test_ports_bind_lie_below_the_ephemeral_range_and_are_not_repeated() -> None:
    high = ephemeral_low()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(max(1024, high - SPAN) <= p < high for p in ports)
    for p in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_a_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The random pick lands first on a port another socket holds, then on a free one: the free one."""
    busy, spare = free_port(), free_port()
    picks = iter([busy, spare])

    class Scripted:
        def randrange(self, low: int, high: int) -> int:
            return next(picks)

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        ports._handed_out.discard(busy)
        ports._handed_out.discard(spare)
        monkeypatch.setattr(ports, "_rng", Scripted())
        assert free_port() == spare


def test_ephemeral_low_reads_the_range_or_falls_back(tmp_path: Path) -> None:
    f = tmp_path / "range"
    f.write_text("40000\t60999\n")
    assert ephemeral_low(f) == 40000
    f.write_text("garbage")
    assert ephemeral_low(f) == DEFAULT_EPHEMERAL_LOW
    assert ephemeral_low(tmp_path / "missing") == DEFAULT_EPHEMERAL_LOW
