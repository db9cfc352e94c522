"""sd_notify(3) without libsystemd: readiness, status, reload, stop and watchdog.

Promise: telling systemd never takes the service down. A missing or broken
notify socket is logged once and otherwise ignored; nothing here raises.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams to one AF_UNIX socket, or does nothing without one.

    Each message is a single datagram of newline-separated KEY=value assignments,
    as systemd reads them. Abstract-namespace sockets are written "@name", as in
    $NOTIFY_SOCKET.
    """

    def __init__(self, socket_path: str | None, *, watchdog_usec: int | None = None) -> None:
        self._path = socket_path or None
        self._address: bytes | None = None
        if self._path is not None:
            # "@name" is Linux's abstract namespace: the kernel wants a leading NUL.
            raw = os.fsencode(self._path)
            self._address = b"\0" + raw[1:] if raw.startswith(b"@") else raw
        if watchdog_usec is not None and watchdog_usec <= 0:
            watchdog_usec = None
        self._watchdog_usec = watchdog_usec
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """Build from the variables systemd sets for a Type=notify service.

        WATCHDOG_USEC only applies when WATCHDOG_PID is unset or names this
        process: a child that inherited the environment is not the one watched.
        """
        path = environ.get("NOTIFY_SOCKET") or None
        if path is not None and not path.startswith(("/", "@")):
            # systemd >= 253 may hand out "vsock:..." addresses; AF_VSOCK is not spoken here.
            log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX socket: notifications disabled", path)
            path = None
        return cls(path, watchdog_usec=_watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured."""
        return self._address is not None

    def watchdog_interval_s(self) -> float | None:
        """How often to call watchdog(): half of WATCHDOG_USEC, or None without a watchdog."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str | None = None) -> None:
        """Startup finished, or a reload announced by reloading() finished."""
        self._send("READY=1", status)

    def status(self, text: str) -> None:
        """Free-form one-line status shown by `systemctl status`."""
        self._send(None, text)

    def watchdog(self) -> None:
        """Keep-alive ping; does nothing when the watchdog does not apply to this process."""
        if self._watchdog_usec is not None:
            self._send("WATCHDOG=1", None)

    def reloading(self, status: str | None = None) -> None:
        """A configuration reload started; call ready() when it is done.

        MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match this message
        to the reload it asked for; older versions ignore the extra assignment.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={now_usec}", status)

    def stopping(self, status: str | None = None) -> None:
        """Shutdown started (intake stopped, draining)."""
        self._send("STOPPING=1", status)

    def _send(self, assignments: str | None, status: str | None) -> None:
        if self._address is None:
            return
        lines = [assignments] if assignments else []
        if status is not None:
            # A newline would start a new assignment: keep status to one line.
            lines.append("STATUS=" + " ".join(status.splitlines()))
        if not lines:
            return
        message = "\n".join(lines).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self._address)
        except OSError as e:
            # Warn once per outage: a watchdog ping every few seconds must not flood
            # the journal while the socket is gone.
            if not self._warned:
                self._warned = True
                log.warning(
                    "sd_notify to %s failed: %s (further failures are not logged "
                    "until a send succeeds)",
                    self._path,
                    e,
                )
            else:
                log.debug("sd_notify to %s failed: %s", self._path, e)
        else:
            self._warned = False


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    raw_usec = environ.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not a process id: watchdog disabled", raw_pid)
            return None
        if pid != os.getpid():
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer: watchdog disabled", raw_usec)
        return None
    if usec <= 0:
        log.warning("WATCHDOG_USEC=%r is not positive: watchdog disabled", raw_usec)
        return None
    return usec
