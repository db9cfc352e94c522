"""A key rotation in the middle of `edge-gateway demo`, as an operator does it.

`edge-gateway hsm rotate` makes the new key on the token and leaves the request in the
spool; SIGHUP makes the running service take it up. From then on the demo's verifiers
hold both keys (what an auditor is given after a rotation: every key the log used), and
at the end the demo checks that the rotation went through all its stages: the entry
covered by an old-key checkpoint, the overlap's checkpoints signed by both keys, then
the new key alone, the old key retired on the token.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.common.errors import GatewayError
from gateway.edge import rotation
from gateway.formats import batchformat, note
from gateway.lab.sandbox import GatewayProc, Sandbox

# The demo's overlap: enough dual-signed checkpoints to see, short enough for a 20 s run.
OVERLAP_CHECKPOINTS = 5
LOG_SECTION = (
    f"\n[log]\nrotation_overlap_checkpoints = {OVERLAP_CHECKPOINTS}\nrotation_overlap_s = 0\n"
)


@dataclass
class RotationReport:
    """What the demo saw of its rotation."""

    number: int = 0
    stage: str = "not requested"
    entry_size: int = 0
    # Checkpoints by signer: the old key alone, both, the new key alone.
    old_only: int = 0
    both: int = 0
    new_only: int = 0
    errors: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return (
            self.stage == "done"
            and not self.errors
            and self.old_only > 0
            and self.both == OVERLAP_CHECKPOINTS
            and self.new_only > 0
        )

    def line(self) -> str:
        return (
            f"rotation {self.number} {self.stage}: entry at tree size {self.entry_size}; "
            f"checkpoints signed by the old key {self.old_only}, by both {self.both}, "
            f"by the new key {self.new_only}"
        )


def request(sb: Sandbox, gw: GatewayProc, new_pem: Path) -> str:
    """`edge-gateway hsm rotate` against the running gateway's config, then SIGHUP.
    Returns the command's own line."""
    done = subprocess.run(
        [
            sb.python,
            "-m",
            "gateway",
            "hsm",
            "rotate",
            "--config",
            str(gw.config),
            "--pem-out",
            str(new_pem),
        ],
        env=sb.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise GatewayError(f"hsm rotate failed ({done.returncode}): {done.stderr.strip()}")
    if gw.proc.proc is None or not gw.proc.alive():
        raise GatewayError("the gateway is not running: nothing to send SIGHUP to")
    gw.proc.proc.send_signal(signal.SIGHUP)
    return done.stdout.strip().splitlines()[0]


def key_state(spool: Path) -> rotation.KeyState:
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        return rotation.read_state(conn)
    finally:
        conn.close()


def wait_done(spool: Path, timeout: float) -> rotation.KeyState:
    """Until the rotation's stage is "done" (the overlap's checkpoints need batches)."""
    deadline = time.monotonic() + timeout
    state = key_state(spool)
    while time.monotonic() < deadline:
        state = key_state(spool)
        if state.rotation is not None and state.rotation.stage == "done":
            return state
        time.sleep(0.2)
    return state


def report(spool: Path, origin: str, old_pem: bytes, new_pem: bytes) -> RotationReport:
    """Which key signed each checkpoint of the spool, against the stages the state says."""
    state = key_state(spool)
    r = state.rotation
    out = RotationReport()
    if r is None:
        return out
    out.number, out.stage, out.entry_size = r.number, r.stage, r.entry_size or 0
    old = note.EcdsaVerifier.from_public_key(origin, batchformat.load_public_key(old_pem))
    new = note.EcdsaVerifier.from_public_key(origin, batchformat.load_public_key(new_pem))
    conn = sqlite3.connect(f"file:{spool}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT size, note FROM log_checkpoint ORDER BY size").fetchall()
    finally:
        conn.close()
    after = 0  # checkpoints past the entry so far
    for size, signed in rows:
        parsed = note.parse_note(bytes(signed))
        by = set()
        for name, v in (("old", old), ("new", new)):
            try:
                note.verify_note(parsed, [v])
            except note.NoteError:
                continue
            by.add(name)
        if not by:
            out.errors.append(f"checkpoint {size} verifies with neither key")
            continue
        if size <= out.entry_size or not out.entry_size:
            want = {"old"}
        else:
            after += 1
            want = {"old", "new"} if after <= OVERLAP_CHECKPOINTS else {"new"}
        if by != want:
            out.errors.append(
                f"checkpoint {size}: signed by {sorted(by)}, its stage wants {sorted(want)}"
            )
        out.old_only += by == {"old"}
        out.both += by == {"old", "new"}
        out.new_only += by == {"new"}
    return out
