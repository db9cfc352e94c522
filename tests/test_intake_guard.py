"""Intake's bounds and its failure path, on a real spool file: dead letters bounded whatever
the input, a bug on the writer thread reported with the message in hand (and the rest of its
group still answered), the crash record and its poison verdict, the reject budget and its
summaries, reject retention."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.common.errors import Rejected, SpoolError
from gateway.edge.config import RejectsConfig, SpoolConfig
from gateway.edge.ingest import DEAD_LETTER_MAX_BYTES, Intake, dead_letter, publishable
from gateway.edge.poison import POISON_AFTER, CrashRecord, Guard, fingerprint
from gateway.edge.profiles import ProfileSet
from gateway.edge.spool import (
    NOT_STORED,
    AppendResult,
    Incoming,
    Outcome,
    RejectRecord,
    Spool,
    prune_rejects,
)


def cfg(path: Path) -> SpoolConfig:
    return SpoolConfig(
        path=path,
        group_commit_max=1000,
        group_commit_wait_ms=20,
        max_depth=1000,
        min_free_bytes=0,
        max_pending_age_s=600,
        retention_batches=0,
    )


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(cfg(tmp_path / "spool.db"), "gw-guard")
    s.open()
    yield s
    s.close()


def tx(device: str, seq: int) -> Incoming:
    leaf = f"{device}/{seq}".encode()
    return Incoming(
        device_id=device,
        device_seq=seq,
        payload_sha256=hashlib.sha256(leaf).digest(),
        tx_id=hashlib.sha256(b"\x00" + leaf + device.encode()).digest(),
        leaf=leaf,
        received_ms=1_700_000_000_000,
    )


@settings(max_examples=300, deadline=None)
@given(
    device=st.one_of(st.none(), st.text(max_size=70_000)),
    topic=st.text(max_size=70_000),
    detail=st.text(max_size=20_000),
    payload=st.binary(max_size=5000),
)
def test_a_dead_letter_stays_bounded_whatever_its_device_topic_and_detail(
    device: str | None, topic: str, detail: str, payload: bytes
) -> None:
    msg = dead_letter(Rejected("not_decodable", detail), device, topic, payload, 1, b"\x00" * 32)
    assert len(msg) <= DEAD_LETTER_MAX_BYTES
    doc = json.loads(msg)
    assert doc["payload_size"] == len(payload)
    assert topic.startswith(doc["topic"])
    if device and doc["device"] == "_invalid":
        raw = device.encode("utf-8", "surrogatepass")
        assert doc["device_sha256"] == hashlib.sha256(raw).hexdigest()


def test_dead_letter_topics_carry_only_ids_the_profiles_allow(spool: Spool) -> None:
    intake = Intake(spool, ProfileSet(gateway_id="gw-guard"), "dl", lambda *_a: None)
    for raw in ("+", "#", "a\x00b", "x" * 129, "ok\n", "", None, "dev-1"):
        topic = intake.reject_topic(raw)
        assert publishable(topic), topic
        assert topic == {"dev-1": "dl/dev-1", "": "dl/_unknown", None: "dl/_unknown"}.get(
            raw, "dl/_invalid"
        )
    assert not publishable("a/+/b") and not publishable("a\x00") and not publishable("x" * 65_536)


def test_a_callback_that_raises_is_reported_and_the_rest_of_its_group_answered(
    spool: Spool,
) -> None:
    reported: list[tuple[str, str, object | None]] = []
    spool.on_fatal(lambda e, where, culprit: reported.append((str(e), where, culprit)))
    answered: list[AppendResult | BaseException] = []
    got = threading.Semaphore(0)

    def fine(res: AppendResult | BaseException) -> None:
        answered.append(res)
        got.release()

    def broken(res: AppendResult | BaseException) -> None:
        got.release()
        raise ValueError("a bug in a caller")

    for i in range(5):
        spool.append_cb(tx("d", i), broken if i == 2 else fine)
    for _ in range(5):
        assert got.acquire(timeout=10)
    assert len(answered) == 4
    assert reported == [("a bug in a caller", "spool append callback", broken)]
    # The writer still serves.
    assert spool.append(tx("d", 9)).result(10).outcome is Outcome.STORED


def test_a_group_commit_that_fails_outside_sqlite_commits_the_others_and_names_the_culprit(
    spool: Spool,
) -> None:
    reported: list[tuple[str, object | None]] = []
    spool.on_fatal(lambda _e, where, culprit: reported.append((where, culprit)))
    results: dict[int, AppendResult | BaseException] = {}
    got = threading.Semaphore(0)
    callbacks = []
    for i in range(6):

        def cb(res: AppendResult | BaseException, i: int = i) -> None:
            results[i] = res
            got.release()

        callbacks.append(cb)
    # A seq SQLite cannot hold (a decoder bug would be needed to let one through).
    items = [tx("d", i) for i in range(5)]
    items.insert(3, tx("d", 2**64))
    for item, cb in zip(items, callbacks, strict=True):
        spool.append_cb(item, cb)
    for _ in range(6):
        assert got.acquire(timeout=10)
    assert reported == [("spool group commit", callbacks[3])]
    assert isinstance(results[3], SpoolError)
    others = [r for i, r in results.items() if i != 3]
    assert all(isinstance(r, AppendResult) and r.outcome is Outcome.STORED for r in others)
    assert spool.stored == 5


def test_a_failure_is_logged_once_recorded_and_a_message_that_failed_twice_is_poison(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = CrashRecord(tmp_path / "spool.db.crashes")
    stops: list[str] = []
    guard = Guard(record, stops.append, "intake")
    with caplog.at_level(logging.ERROR):
        for what in ("boom", "again"):
            try:
                raise RuntimeError(what)
            except RuntimeError as e:
                guard.fatal(e, "spool append callback", ("devices/d/tx", b"bad"))
    assert len(stops) == 1 and guard.later_failures == 1
    assert [r.getMessage().count("Traceback") for r in caplog.records] == [1]
    fp = fingerprint("devices/d/tx", b"bad")
    assert record.load() == {fp: 1}

    # The next start: one failure on record is a suspect, not poison; once it goes through,
    # its record is cleared.
    guard = Guard(record, stops.append)
    assert guard.crashes(guard.check("devices/d/tx", b"bad")) == 1
    assert guard.check("devices/d/tx", b"fine") != fp
    guard.settled(fp)
    assert record.load() == {}

    for _ in range(POISON_AFTER):
        Guard(record, stops.append).fatal(RuntimeError("x"), "w", ("devices/d/tx", b"bad"))
    guard = Guard(record, stops.append)
    assert guard.crashes(guard.check("devices/d/tx", b"bad")) == POISON_AFTER
    guard.settled(fp)  # poison stays on record
    assert record.load() == {fp: POISON_AFTER}
    # No record: no hashing at all.
    assert Guard(CrashRecord(tmp_path / "other")).check("t", b"p") is None


def test_poison_is_refused_on_arrival_and_dead_lettered(spool: Spool, tmp_path: Path) -> None:
    record = CrashRecord(tmp_path / "crashes")
    for _ in range(POISON_AFTER):
        Guard(record).fatal(RuntimeError("x"), "w", ("devices/d-1/tx", b'{"seq": 1}'))
    letters: list[tuple[str, bytes]] = []
    intake = Intake(
        spool,
        ProfileSet(gateway_id="gw-guard"),
        "dl",
        lambda _id, t, m: letters.append((t, m)),
        guard=Guard(record),
    )
    done: list[tuple[AppendResult | BaseException, Rejected | None]] = []
    got = threading.Semaphore(0)

    def cb(res: AppendResult | BaseException, rej: Rejected | None) -> None:
        done.append((res, rej))
        got.release()

    intake.submit("d-1", "devices/d-1/tx", b'{"seq": 1}', "mqtt", cb)
    intake.submit("d-1", "devices/d-1/tx", b'{"seq": 2}', "mqtt", cb)
    assert got.acquire(timeout=10) and got.acquire(timeout=10)
    reasons = sorted(rej.reason if rej else "stored" for _res, rej in done)
    assert reasons == ["poison", "stored"]
    assert [(t, json.loads(m)["reason"]) for t, m in letters] == [("dl/d-1", "poison")]


def test_rejects_past_the_budget_are_counted_then_summarised(spool: Spool) -> None:
    letters: list[tuple[str, dict[str, object]]] = []
    now = [0.0]
    intake = Intake(
        spool,
        ProfileSet(gateway_id="gw-guard"),
        "dl",
        lambda _id, t, m: letters.append((t, json.loads(m))),
        rejects=RejectsConfig(per_s=1, burst=10, summary_every_s=0.1),
        clock=lambda: now[0],
    )
    results: list[AppendResult | BaseException] = []
    got = threading.Semaphore(0)

    def cb(res: AppendResult | BaseException, _rej: Rejected | None) -> None:
        results.append(res)
        got.release()

    for i in range(100):
        intake.submit("flood", "devices/flood/tx", b"\xff%d" % i, "mqtt", cb)
    now[0] += 5.0  # five more tokens
    for _ in range(10):
        intake.submit("flood", "devices/flood/tx", b"[]", "mqtt", cb)
    intake.submit("other", "devices/other/tx", b"\xff", "mqtt", cb)
    for _ in range(111):
        assert got.acquire(timeout=10)
    outcomes = [r.outcome for r in results if isinstance(r, AppendResult)]
    assert outcomes.count(Outcome.REJECT_RECORDED) == 10 + 5 + 1
    assert outcomes.count(Outcome.NOT_STORED) == 90 + 5
    assert spool.rejects == 111
    assert intake.flush_summaries(force=True) == 1
    spool.write(lambda _c: None).result(10)
    [summary] = [doc for _t, doc in letters if doc.get("summary")]
    assert summary["device"] == "flood" and summary["rejected"] == 95
    assert summary["reasons"] == {"bad_encoding": 90, "wrong_type": 5}
    assert len([1 for _t, doc in letters if "reason" in doc]) == 16


def test_prune_rejects_by_age_then_beyond_the_count_kept(spool: Spool) -> None:
    for i in range(50):
        rec = RejectRecord("not_decodable", "d", "dl/d", b"{}", 1000 + i)
        spool.append(rec).result(10)
    spool.append(NOT_STORED).result(10)
    assert prune_rejects(spool, older_than_ms=1010, keep=100) == 10
    assert prune_rejects(spool, older_than_ms=0, keep=15) == 25
    ids = spool.read(lambda c: c.execute("SELECT min(id), max(id) FROM reject").fetchone())
    assert ids.result(10) == (36, 50)
    assert prune_rejects(spool, older_than_ms=0, keep=15) == 0
