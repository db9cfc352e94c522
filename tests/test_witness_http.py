"""The tlog-witness HTTP endpoint, driven by plain HTTP clients as a third-party log would
drive it, on loopback; and our witness witnessing a log that is not ours."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.formats import checkpoint, cosignature, merkle, note
from gateway.formats.checkpoint import Checkpoint
from gateway.ledger import witness_http
from gateway.ledger.witness import LogKey, Witness
from tests.test_witness import ORIGIN, WITNESS, TestLog, ed_key

THIRD_PARTY = "example.com/behind-the-sofa"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[witness_http.RunningWitnessHTTP, TestLog, Witness]]:
    log = TestLog()
    log.grow(5)
    db = sqlite3.connect(tmp_path / "node.sqlite", isolation_level=None, check_same_thread=False)
    w = Witness(db, WITNESS, ed_key("witness"), [LogKey(ORIGIN, log.verifiers())])
    running = witness_http.serve(w, "127.0.0.1", 0, timeout_s=2.0)
    try:
        yield running, log, w
    finally:
        running.close()
        db.close()


def post(
    conn: http.client.HTTPConnection, body: bytes, path: str = "/add-checkpoint"
) -> tuple[int, str, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": "text/plain"})
    resp = conn.getresponse()
    return resp.status, resp.getheader("Content-Type") or "", resp.read()


def body(old: int, proof: list[bytes], signed: bytes) -> bytes:
    # Written from the spec, not with witness_http.request_body: "old <size>\n", one base64
    # hash per line, an empty line, the signed checkpoint.
    lines = [f"old {old}"] + [base64.b64encode(h).decode() for h in proof]
    return ("\n".join(lines) + "\n\n").encode() + signed


def witness_verifier() -> cosignature.CosignatureVerifier:
    return cosignature.CosignatureVerifier(WITNESS, note.ed25519_public_bytes(ed_key("witness")))


def test_add_checkpoint_over_http_with_keep_alive(
    served: tuple[witness_http.RunningWitnessHTTP, TestLog, Witness],
) -> None:
    running, log, w = served
    conn = http.client.HTTPConnection("127.0.0.1", running.server.port, timeout=10)
    try:
        signed = log.checkpoint()
        status, ctype, answer = post(conn, body(0, [], signed))
        assert status == 200, answer
        # As the spec suggests: append the answer to the checkpoint and verify the note
        # with the witness keys we trust.
        opened = note.open_note(signed + answer, [witness_verifier()])
        assert [s.name for s in opened.verified] == [WITNESS]
        assert answer.startswith("\u2014 ".encode()) and answer.endswith(b"\n")

        # Growth, on the same connection.
        log.grow(10)
        status, _, answer = post(conn, body(5, log.proof(5), log.checkpoint()))
        assert status == 200
        assert w.known_size(ORIGIN) == 15

        # Old size mismatch: 409, text/x.tlog.size, the known size and a newline.
        log.grow(1)
        status, ctype, answer = post(conn, body(5, log.proof(5), log.checkpoint()))
        assert (status, ctype, answer) == (409, "text/x.tlog.size", b"15\n")

        # A proof that does not verify: 422.
        proof = log.proof(15)
        status, _, _ = post(conn, body(15, [proof[0][::-1], *proof[1:]], log.checkpoint()))
        assert status == 422

        # A key the witness does not trust: 403. An origin it does not know: 404.
        impostor = TestLog(ORIGIN, [note.Ed25519Signer(ORIGIN, ed_key("impostor"))])
        impostor.leaves = list(log.leaves)
        status, _, _ = post(conn, body(15, log.proof(15), impostor.checkpoint()))
        assert status == 403
        other = TestLog("log.example/unknown")
        other.grow(1)
        status, _, _ = post(conn, body(0, [], other.checkpoint()))
        assert status == 404

        # Old size above the checkpoint's: 400.
        status, _, _ = post(conn, body(17, [], log.checkpoint()))
        assert status == 400
        assert w.known_size(ORIGIN) == 15
    finally:
        conn.close()


def test_a_split_view_over_http(
    served: tuple[witness_http.RunningWitnessHTTP, TestLog, Witness],
) -> None:
    running, log, w = served
    conn = http.client.HTTPConnection("127.0.0.1", running.server.port, timeout=10)
    try:
        assert post(conn, body(0, [], log.checkpoint()))[0] == 200
        fork = TestLog(ORIGIN, log.signers)
        fork.grow(5, tag="fork")
        status, _, answer = post(conn, body(5, [], fork.checkpoint()))
        assert status == 409 and b"split view" in answer
        assert len(w.evidence(ORIGIN)) == 1
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"old 05\n\n", "leading zero"),
        (b"old -1\n\n", "negative"),
        (b"old 1 \n\n", "trailing space"),
        (b"new 1\n\n", "not old"),
        (b"old 0\nnot base64!\n\nx", "proof line not base64"),
        (b"old 0\n" + base64.b64encode(b"x" * 31) + b"\n\nx", "31-byte hash"),
        (b"old 0\n", "no empty line"),
        (b"old 0\n\n", "no checkpoint"),
        (b"old 0\n\nnot a note", "not a note"),
        (b"old 0\n" + (base64.b64encode(b"x" * 32) + b"\n") * 64 + b"\nx", "64 proof lines"),
        (b"old 99999999999999999999\n\nx", "old size beyond 2^64-1"),
    ],
)
def test_malformed_requests_are_400(
    served: tuple[witness_http.RunningWitnessHTTP, TestLog, Witness], raw: bytes, why: str
) -> None:
    running, _, w = served
    conn = http.client.HTTPConnection("127.0.0.1", running.server.port, timeout=10)
    try:
        status, _, answer = post(conn, raw)
        assert status == 400, (why, answer)
        assert answer.count(b"\n") == 1  # one line
    finally:
        conn.close()
    assert w.known_size(ORIGIN) == 0


def test_sizes_paths_and_methods_are_bounded(
    served: tuple[witness_http.RunningWitnessHTTP, TestLog, Witness],
) -> None:
    running, log, _ = served
    url = running.url
    # Too large: refused from its Content-Length, before the body is read.
    conn = http.client.HTTPConnection("127.0.0.1", running.server.port, timeout=10)
    try:
        conn.putrequest("POST", "/add-checkpoint")
        conn.putheader("Content-Length", str(witness_http.MAX_BODY_BYTES + 1))
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413
        resp.read()
    finally:
        conn.close()
    for path, method, status in (
        ("/add-checkpoint", "GET", 405),
        ("/other", "POST", 404),
        ("/add-checkpoint/", "POST", 404),
    ):
        req = urllib.request.Request(
            url + path, data=b"" if method == "POST" else None, method=method
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == status
    # Without a Content-Length: 411.
    s = socket.create_connection(("127.0.0.1", running.server.port), timeout=10)
    try:
        s.sendall(b"POST /add-checkpoint HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 411 ")
    finally:
        s.close()
    # A client that stops sending mid-body is cut off after the timeout (2 s here).
    s = socket.create_connection(("127.0.0.1", running.server.port), timeout=10)
    try:
        t0 = time.monotonic()
        s.sendall(b"POST /add-checkpoint HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nold 0")
        assert s.recv(100) == b""
        assert time.monotonic() - t0 < 8
    finally:
        s.close()
    # Still serving.
    req = urllib.request.Request(url + "/add-checkpoint", data=body(0, [], log.checkpoint()))
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def test_connections_beyond_the_limit_are_closed(tmp_path: Path) -> None:
    log = TestLog()
    log.grow(2)
    db = sqlite3.connect(tmp_path / "n.sqlite", isolation_level=None, check_same_thread=False)
    w = Witness(db, WITNESS, ed_key("witness"), [LogKey(ORIGIN, log.verifiers())])
    running = witness_http.serve(w, "127.0.0.1", 0, max_connections=1, timeout_s=3.0)
    try:
        idle = socket.create_connection(("127.0.0.1", running.server.port), timeout=10)
        time.sleep(0.3)  # the server takes the first connection and waits for its request
        extra = socket.create_connection(("127.0.0.1", running.server.port), timeout=10)
        extra.sendall(b"POST /add-checkpoint HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            assert extra.recv(100) == b""
        extra.close()
        idle.close()
        # Once the slot is free, requests are served again.
        deadline = time.monotonic() + 5
        while True:
            try:
                req = urllib.request.Request(
                    running.url + "/add-checkpoint", data=body(0, [], log.checkpoint())
                )
                with urllib.request.urlopen(req, timeout=5) as resp:
                    assert resp.status == 200
                break
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        running.close()
        db.close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_our_witness_witnesses_a_log_that_is_not_ours(tmp_path: Path) -> None:
    """A log with its own Ed25519 key and origin, built here with the signed-note code:
    our witness follows it through a submission prefix over plain urllib, and its
    cosignatures verify as the spec's clients verify them."""
    log_key = ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"sofa").digest())
    signer = note.Ed25519Signer(THIRD_PARTY, log_key)
    # The log publishes its vkey; the witness is configured from it.
    log_vkey = signer.verifier().vkey()
    db = sqlite3.connect(tmp_path / "n.sqlite", isolation_level=None, check_same_thread=False)
    w = Witness(db, WITNESS, ed_key("witness"), [LogKey(THIRD_PARTY, (note.parse_vkey(log_vkey),))])
    host = "::1" if ipv6_loopback() else "127.0.0.1"
    running = witness_http.serve(w, host, 0, prefix="/witness/v1")
    leaves: list[bytes] = []
    old = 0
    try:
        cosigner = cosignature.parse_cosigner_vkey(w.vkey)
        for step in range(4):
            leaves += [f"sofa entry {len(leaves) + i}".encode() for i in range(3 + 5 * step)]
            cp = Checkpoint(THIRD_PARTY, len(leaves), merkle.root(leaves))
            signed = note.sign_note(cp.body(), [signer]).serialise()
            proof = merkle.consistency_proof(leaves, old) if old else []
            req = urllib.request.Request(
                running.url + "/add-checkpoint",
                data=witness_http.request_body(old, proof, signed),
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                assert resp.status == 200
                answer = resp.read()
            [line] = witness_http.cosignature_lines(answer)
            cosigned = note.parse_note(signed).with_signatures([line])
            opened = note.verify_note(cosigned, [signer.verifier(), cosigner])
            assert {s.name for s in opened.verified} == {THIRD_PARTY, WITNESS}
            old = len(leaves)
        assert w.known_size(THIRD_PARTY) == old
        # A wrong old size tells the log where the witness stands.
        req = urllib.request.Request(
            running.url + "/add-checkpoint",
            data=witness_http.request_body(3, [], signed),
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 409
        assert e.value.headers["Content-Type"] == "text/x.tlog.size"
        assert e.value.read() == f"{old}\n".encode()
        # The checkpoint as the witness stored it.
        latest = w.latest(THIRD_PARTY)
        assert latest is not None
        assert checkpoint.open_checkpoint(latest, [signer.verifier()]).checkpoint.size == old
    finally:
        running.close()
        db.close()


def test_request_body_round_trips() -> None:
    proof = [hashlib.sha256(bytes([i])).digest() for i in range(63)]
    req = witness_http.parse_request(witness_http.request_body(7, proof, b"n\n\n- x\n"))
    assert req == witness_http.AddCheckpoint(7, tuple(proof), b"n\n\n- x\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bodies_fail_only_as_malformed(data: bytes) -> None:
    for body_ in (data, b"old 0\n" + data, b"old 3\n\n" + data):
        with contextlib.suppress(witness_http.MalformedRequest):
            witness_http.parse_request(body_)
