"""The tlog-witness HTTP interface of a ledger node: `POST <prefix>/add-checkpoint`.

Promise: any client that speaks c2sp.org/tlog-witness (a third-party log, or our gateway)
gets the spec's answers: 200 with the cosignature line, 409 `text/x.tlog.size` with the
size last cosigned, 422 for a proof that does not verify, 403, 404, and 400 for anything
malformed. A request is bounded in bytes and proof lines before it is parsed, the number
of connections served at once is bounded, and a slow client is cut off by a timeout.
Standard library only; meant for loopback or behind a bastion (the spec's
c2sp.org/https-bastion), since the protocol itself has no client authentication.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gateway.formats import merkle
from gateway.formats.checkpoint import Checkpoint
from gateway.formats.note import (
    MAX_NOTE_BYTES,
    MalformedNote,
    NoteSignature,
    b64decode_strict,
    b64encode,
    parse_note,
)
from gateway.ledger.witness import (
    MAX_PROOF_LINES,
    OldSizeMismatch,
    Witness,
    WitnessError,
)

log = logging.getLogger(__name__)

SIZE_CONTENT_TYPE = "text/x.tlog.size"
# "old <20 digits>\n", at most 63 lines of 44 base64 characters and a newline, "\n".
MAX_HEAD_BYTES = 4 + 20 + 1 + MAX_PROOF_LINES * 45 + 1
MAX_BODY_BYTES = MAX_HEAD_BYTES + MAX_NOTE_BYTES
# Connections served at once; more are closed at once rather than queued.
DEFAULT_MAX_CONNECTIONS = 32
# Seconds a connection may sit idle or take to send its request.
DEFAULT_TIMEOUT_S = 10.0
_OLD = re.compile(rb"old (0|[1-9][0-9]{0,19})", re.ASCII)

Check = Callable[[Checkpoint], None]


class MalformedRequest(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class AddCheckpoint:
    old_size: int
    proof: tuple[bytes, ...]
    note: bytes


def parse_request(body: bytes) -> AddCheckpoint:
    """The add-checkpoint body: `old <size>`, proof lines, an empty line, the note."""
    if len(body) > MAX_BODY_BYTES:
        raise MalformedRequest(f"request is {len(body)} bytes, at most {MAX_BODY_BYTES}")
    # The first empty line ends the proof; it lies within the bounded head.
    end = body.find(b"\n\n", 0, MAX_HEAD_BYTES + 1)
    if end < 0:
        raise MalformedRequest("no empty line after the old size and consistency proof")
    lines = body[:end].split(b"\n")
    m = _OLD.fullmatch(lines[0])
    if m is None:
        raise MalformedRequest("first line is not `old <size>` in decimal without leading zeros")
    old = int(m.group(1))
    if old > 2**64 - 1:
        raise MalformedRequest("old size exceeds 2^64-1")
    if len(lines) - 1 > MAX_PROOF_LINES:
        raise MalformedRequest(f"{len(lines) - 1} consistency proof lines, at most 63")
    proof: list[bytes] = []
    for line in lines[1:]:
        try:
            h = b64decode_strict(line.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise MalformedRequest("a consistency proof line is not base64") from None
        if len(h) != merkle.HASH_SIZE:
            raise MalformedRequest(f"a consistency proof hash is {len(h)} bytes, expected 32")
        proof.append(h)
    note = body[end + 2 :]
    if not note:
        raise MalformedRequest("no checkpoint after the empty line")
    return AddCheckpoint(old, tuple(proof), note)


def request_body(old_size: int, proof: Sequence[bytes], note: bytes) -> bytes:
    """What a client sends: the inverse of parse_request."""
    head = f"old {old_size}\n" + "".join(b64encode(h) + "\n" for h in proof)
    return head.encode() + b"\n" + note


class _Handler(BaseHTTPRequestHandler):
    server: WitnessHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the spec asks of witnesses
    # Headers and body go out in two writes; with Nagle on, the second waits for the
    # client's delayed ACK (40 ms on Linux) on a kept-alive connection.
    disable_nagle_algorithm = True
    server_version = "edge-gateway-witness"
    sys_version = ""

    def setup(self) -> None:
        self.request.settimeout(self.server.timeout_s)
        super().setup()

    def do_POST(self) -> None:
        if self.path != self.server.prefix + "/add-checkpoint":
            self._reply(HTTPStatus.NOT_FOUND, f"no such endpoint {self.path[:100]}\n")
            return
        body = self._read_body()
        if body is None:
            return
        try:
            req = parse_request(body)
        except MalformedRequest as e:
            self._reply(HTTPStatus.BAD_REQUEST, f"{e}\n")
            return
        try:
            line = self.server.witness.add_checkpoint(
                req.note, req.old_size, req.proof, check=self.server.check
            )
        except OldSizeMismatch as e:
            self._reply(HTTPStatus.CONFLICT, f"{e.known_size}\n", SIZE_CONTENT_TYPE)
            return
        except WitnessError as e:
            self._reply(HTTPStatus(e.http_status), f"{e}\n")
            return
        except Exception:
            # A `check` hook's refusal or a bug: the client learns only that it failed.
            log.exception("add-checkpoint failed")
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")
            return
        self._reply(HTTPStatus.OK, line.line())

    def do_GET(self) -> None:
        self._reply(HTTPStatus.METHOD_NOT_ALLOWED, "only POST add-checkpoint\n", allow="POST")

    do_PUT = do_DELETE = do_PATCH = do_GET

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._reply(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length, not chunks\n")
            self.close_connection = True
            return None
        text = self.headers.get("Content-Length")
        if text is None or not text.isdigit() or len(text) > 12:
            self._reply(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required\n")
            self.close_connection = True
            return None
        length = int(text)
        if length > MAX_BODY_BYTES:
            self._reply(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"request is {length} bytes, at most {MAX_BODY_BYTES}\n",
            )
            self.close_connection = True
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            return None
        if len(body) != length:
            self.close_connection = True
            return None
        return body

    def _reply(
        self,
        status: HTTPStatus,
        text: str,
        content_type: str = "text/plain; charset=utf-8",
        allow: str | None = None,
    ) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if allow is not None:
            self.send_header("Allow", allow)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class WitnessHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer with a bounded number of connections served at once."""

    daemon_threads = True
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        witness: Witness,
        *,
        prefix: str = "",
        check: Check | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if prefix.endswith("/") or (prefix and not prefix.startswith("/")):
            raise ValueError(f"submission prefix {prefix!r}: start with / and end without one")
        self.witness = witness
        self.prefix = prefix
        self.check = check
        self.timeout_s = timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("witness HTTP: connection from %s refused, all slots busy", client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class RunningWitnessHTTP:
    """A WitnessHTTPServer on its own thread; `close()` stops it."""

    def __init__(self, server: WitnessHTTPServer) -> None:
        self.server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="witness-http", kwargs={"poll_interval": 0.2}
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host = str(self.server.server_address[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.server.port}{self.server.prefix}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


def serve(
    witness: Witness,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    prefix: str = "",
    check: Check | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> RunningWitnessHTTP:
    """Serve add-checkpoint on (host, port) until close(); port 0 picks a free one."""
    server = WitnessHTTPServer(
        (host, port),
        witness,
        prefix=prefix,
        check=check,
        max_connections=max_connections,
        timeout_s=timeout_s,
    )
    log.info("witness %s: add-checkpoint on %s:%d%s", witness.name, host, server.port, prefix)
    return RunningWitnessHTTP(server)


def cosignature_lines(body: bytes) -> list[NoteSignature]:
    """Parse a 200 answer: one or more note signature lines (the caller verifies them)."""
    try:
        return list(parse_note(b"x\n\n" + body).signatures)
    except MalformedNote as e:
        raise MalformedRequest(f"witness answer: {e.detail}") from None
