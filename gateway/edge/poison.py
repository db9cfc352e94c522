"""Messages that make intake fail: the failure stops the gateway, the message is set aside.

An unexpected exception in intake is a bug. It is logged once with its traceback and stops
the gateway with exit 70, so systemd restarts it; the broker then delivers again what was
not acknowledged. If the message in hand caused the failure, that would repeat forever, so
its fingerprint (topic and payload SHA-256) is recorded in `<spool>.crashes`, shared by the
gateway's processes. A message recorded POISON_AFTER times is refused on arrival with
reason `poison` (recorded, dead-lettered, acknowledged) instead of being processed again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from gateway.common.errors import EXIT_SOFTWARE

log = logging.getLogger("gateway.intake")

POISON_AFTER = 2
# The record holds at most this many messages, each for at most RECORD_TTL_S.
MAX_RECORDS = 256
RECORD_TTL_S = 7 * 86400.0
# A traceback in the log is cut at this many characters (a message may be in its text).
TRACEBACK_CHARS = 8192
# What a message in hand is: its topic and payload.
Source = tuple[str, bytes]


def fingerprint(topic: str, payload: bytes) -> str:
    """The message's identity across redeliveries: SHA-256 over its topic and payload hash."""
    t = topic.encode("utf-8", "surrogatepass")
    h = hashlib.sha256(len(t).to_bytes(4, "big"))
    h.update(t)
    h.update(hashlib.sha256(payload).digest())
    return h.hexdigest()


class CrashRecord:
    """`<spool>.crashes`: fingerprint -> failures, a small JSON file under an flock."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, int]:
        return {fp: int(str(e.get("crashes", 0))) for fp, e in self._update(None).items()}

    def add(self, fp: str, topic: str, size: int) -> int:
        """One more failure with this message in hand; returns its count (0 if unrecorded)."""

        def change(entries: dict[str, dict[str, object]]) -> None:
            e = entries.setdefault(fp, {"crashes": 0})
            e["crashes"] = int(str(e.get("crashes", 0))) + 1
            e["topic"] = topic[:128]
            e["size"] = size
            e["last"] = time.time()

        return int(str(self._update(change).get(fp, {}).get("crashes", 0)))

    def clear(self, fp: str) -> None:
        def change(entries: dict[str, dict[str, object]]) -> None:
            entries.pop(fp, None)

        self._update(change)

    def _update(
        self, change: Callable[[dict[str, dict[str, object]]], None] | None
    ) -> dict[str, dict[str, object]]:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            log.warning("crash record %s cannot be opened: %s", self.path, e.strerror)
            return {}
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = b""
            while chunk := os.read(fd, 65536):
                raw += chunk
            entries: dict[str, dict[str, object]] = {}
            if raw:
                try:
                    loaded = json.loads(raw)
                    entries = {
                        str(k): v
                        for k, v in loaded.get("messages", {}).items()
                        if isinstance(v, dict)
                    }
                except (ValueError, AttributeError):
                    log.warning("crash record %s is unreadable; starting it afresh", self.path)
            cutoff = time.time() - RECORD_TTL_S
            entries = {k: v for k, v in entries.items() if float(str(v.get("last", 0))) >= cutoff}
            if change is None:
                return entries
            change(entries)
            newest = sorted(entries.items(), key=lambda kv: -float(str(kv[1].get("last", 0))))
            entries = dict(newest[:MAX_RECORDS])
            data = json.dumps({"messages": entries}, sort_keys=True).encode("utf-8")
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, data)
            os.fsync(fd)
            return entries
        except OSError as e:
            log.warning("crash record %s cannot be updated: %s", self.path, e.strerror)
            return {}
        finally:
            os.close(fd)


class Guard:
    """One per process: answers whether a message failed intake before, and turns an
    unexpected exception into one logged failure that stops the process's gateway."""

    def __init__(
        self,
        record: CrashRecord | None = None,
        on_fatal: Callable[[str], None] | None = None,
        what: str = "intake",
    ) -> None:
        self._record = record
        self._on_fatal = on_fatal
        self._what = what
        self._counts = record.load() if record is not None else {}
        self._lock = threading.Lock()
        self.failure: str | None = None
        self.later_failures = 0

    def crashes(self, fp: str | None) -> int:
        """How often intake failed with this message in hand (fingerprint from `check`)."""
        return 0 if fp is None else self._counts.get(fp, 0)

    def check(self, topic: str, payload: bytes) -> str | None:
        """The message's fingerprint if any message is on record, else None (no hashing)."""
        return fingerprint(topic, payload) if self._counts else None

    def settled(self, fp: str | None) -> None:
        """The message went through: a failure on record for it was someone else's."""
        if fp is None or fp not in self._counts or self._counts[fp] >= POISON_AFTER:
            return
        del self._counts[fp]
        if self._record is not None:
            self._record.clear(fp)

    def fatal(self, exc: BaseException, where: str, source: Source | None = None) -> None:
        """An unexpected exception: log it once with its traceback, record the message in
        hand, stop. Later ones (the same bug, again) are only counted."""
        with self._lock:
            if self.failure is not None:
                self.later_failures += 1
                return
            text = str(exc)
            head = f"{self._what}: internal error in {where}: {type(exc).__name__}: {text[:300]}"
            self.failure = head
        blamed = ""
        if source is not None:
            topic, payload = source
            fp = fingerprint(topic, payload)
            n = self._record.add(fp, topic, len(payload)) if self._record is not None else 0
            blamed = (
                f"; the message in hand (topic {topic[:80]!r}, {len(payload)} bytes, "
                f"fingerprint {fp[:16]}) failed intake {n} time(s), set aside as poison at "
                f"{POISON_AFTER}"
            )
        tb = "".join(traceback.format_exception(exc))
        if len(tb) > TRACEBACK_CHARS:
            tb = tb[: TRACEBACK_CHARS // 2] + "\n...\n" + tb[-TRACEBACK_CHARS // 2 :]
        log.error(
            "%s (a bug)%s; stopping so the service restarts (exit %d)\n%s",
            head,
            blamed,
            EXIT_SOFTWARE,
            tb,
        )
        if self._on_fatal is not None:
            self._on_fatal(head)

    def thread_hook(self, args: threading.ExceptHookArgs) -> None:
        """threading.excepthook: a thread that dies of an exception is a failure too."""
        if args.exc_value is None or isinstance(args.exc_value, SystemExit):
            return
        name = args.thread.name if args.thread is not None else "?"
        self.fatal(args.exc_value, f"thread {name}")

    def spool_hook(self, exc: BaseException, where: str, culprit: object | None) -> None:
        """Spool.on_fatal: `culprit` is the append callback that failed, if one did."""
        source = getattr(culprit, "source", None)
        self.fatal(exc, where, source if isinstance(source, tuple) else None)


def exit_after(seconds: float, code: int = EXIT_SOFTWARE) -> None:
    """A backstop once a failure started the stop: if the graceful stop hangs (a stuck
    thread), the process exits anyway. Nothing acknowledged is lost by it: acknowledgements
    follow durable commits."""

    def later() -> None:
        time.sleep(seconds)
        log.error("stop did not finish within %.0f s after an internal error; exiting", seconds)
        with contextlib.suppress(OSError):
            logging.shutdown()
        os._exit(code)

    threading.Thread(target=later, name="exit-backstop", daemon=True).start()
