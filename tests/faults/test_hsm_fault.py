"""The HSM goes away mid-run: batching pauses, intake keeps spooling, signing resumes."""

from __future__ import annotations

import shutil
import time

import pytest

from gateway.lab.sandbox import Sandbox
from tests.conftest import deploy
from tests.faults import harness
from tests.faults.conftest import FAULT_BATCH

pytestmark = pytest.mark.integration


def test_hsm_token_lost_mid_run_pauses_batching_and_resumes(sandbox: Sandbox) -> None:
    d = deploy(sandbox, batch=FAULT_BATCH)
    gw = d.start_gateway()
    pub = harness.Publisher(d.broker.port, "hsm-fault", devices=50, tls=d.sandbox.mqtt_tls())
    pub.publish(1000, rate=2000)
    pub.wait_acked()
    harness.wait_committed(gw, d.ledgers, pub.acked, timeout=60)
    signed_before = harness.status(gw).last_signed_seq

    # The token's objects vanish under the open session, as when an HSM is reset.
    tokens = d.hsm.conf.parent / "tokens"
    shutil.move(tokens, tokens.with_suffix(".away"))
    try:
        pub.publish(2000, rate=2000)
        pub.wait_acked()
        deadline = time.monotonic() + 20
        while harness.status(gw).hsm_state == "ok" and time.monotonic() < deadline:
            time.sleep(0.2)
        # Intake keeps spooling: the broker's acknowledgements to the publisher may be
        # ahead of the gateway's by what is in flight to it.
        while harness.status(gw).transactions_stored < len(pub.acked) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        st = harness.status(gw)
        assert st.hsm_state != "ok"
        assert st.last_signed_seq == signed_before  # nothing signed without the HSM
        assert st.transactions_stored == len(pub.acked)  # intake kept spooling
        assert st.spool_depth == 2000
        assert gw.proc.alive()
    finally:
        shutil.move(tokens.with_suffix(".away"), tokens)
    t0 = time.monotonic()
    harness.wait_committed(gw, d.ledgers, pub.acked, timeout=60)
    pub.close()
    assert harness.status(gw).hsm_state == "ok"
    a = harness.audit(gw, d.ledgers, pub.acked)
    harness.record("HSM token lost mid-run", a, time.monotonic() - t0)
