"""The monitor withholds WATCHDOG=1 while a stage is stuck, so systemd restarts the
gateway; it pings while every stage turns. Real notify socket, stand-in stages."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from types import SimpleNamespace

from gateway.common.notify import Notifier
from gateway.edge.config import parse_gateway_config
from gateway.edge.service import Gateway


def run_monitor(
    tmp_path: Path, batcher_beat: float, forwarder_beat: float, intake_beat: float | None = None
) -> list[str]:
    cfg = parse_gateway_config(
        {
            "gateway": {"id": "gw-watchdog"},
            "hsm": {"token_label": "edge", "pin_file": str(tmp_path / "pin")},
            "mqtt": {"plaintext": True},
            "spool": {"path": str(tmp_path / "spool.db")},
            "forwarder": {
                "plaintext": True,
                "nodes": [{"id": "ledger-1", "address": "127.0.0.1:7001"}],
                "backoff_max_s": 1,
                "call_timeout_s": 1,
            },
            "api": {"plaintext": True},
        },
        tmp_path / "gateway.toml",
    )
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.1)
    received: list[str] = []

    async def main() -> None:
        gw = Gateway(cfg, Notifier(str(sock_path), watchdog_usec=1_000_000))
        gw.ready = True
        gw.batcher = SimpleNamespace(  # type: ignore[assignment]
            depth=0, oldest_pending_ms=None, next_seq=0, last_progress=batcher_beat
        )
        gw.forwarder = SimpleNamespace(  # type: ignore[assignment]
            heartbeat=lambda: forwarder_beat, last_committed_seq=-1, nodes=[]
        )
        gw.mqtt = SimpleNamespace(  # type: ignore[assignment]
            load=lambda: 0,
            paused=False,
            connected=True,
            release=lambda: None,
            resume=lambda: None,
            pause=lambda: None,
            heartbeat=lambda: time.monotonic() if intake_beat is None else intake_beat,
        )
        task = asyncio.create_task(gw._monitor())
        await asyncio.sleep(2.5)
        gw.stop_event.set()
        await task

    asyncio.run(main())
    while True:
        try:
            received.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    sock.close()
    return received


def test_pings_while_every_stage_turns(tmp_path: Path) -> None:
    now = time.monotonic()
    got = run_monitor(tmp_path, now, now)
    assert sum("WATCHDOG=1" in m for m in got) >= 2


def test_stuck_batcher_withholds_pings(tmp_path: Path) -> None:
    now = time.monotonic()
    got = run_monitor(tmp_path, now - 3600, now)
    assert not any("WATCHDOG=1" in m for m in got)


def test_stuck_forwarder_withholds_pings(tmp_path: Path) -> None:
    now = time.monotonic()
    got = run_monitor(tmp_path, now, now - 3600)
    assert not any("WATCHDOG=1" in m for m in got)


def test_stuck_intake_withholds_pings(tmp_path: Path) -> None:
    """The intake process beats while it turns (idle included); no beat for longer than
    the stuck limit, e.g. a writer thread that no longer answers, stops the pings."""
    now = time.monotonic()
    got = run_monitor(tmp_path, now, now, intake_beat=now - 3600)
    assert not any("WATCHDOG=1" in m for m in got)
