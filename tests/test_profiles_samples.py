"""Every shipped profile decodes its valid samples and rejects its invalid ones.

firmware_profiles/samples/<profile>/manifest.toml names each sample, the topic
it arrives on and its outcome; accepted samples pin tx_id and fields, and
tests/vectors/profiles.json pins their exact leaf bytes. A seq sent again with
other content goes through a real spool, which refuses it.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from gateway.common.errors import Rejected
from gateway.edge.config import SpoolConfig
from gateway.edge.ingest import Intake
from gateway.edge.profiles import REASONS, ProfileSet
from gateway.edge.spool import AppendResult, Spool
from gateway.formats.canonical import tx_id

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "firmware_profiles"
SAMPLES = PROFILES / "samples"
VECTORS = json.loads((Path(__file__).parent / "vectors" / "profiles.json").read_text())
SHIPPED = ("nbiot-meter", "lte-m-tracker", "cellsite-power", "cdr-usage", "esim-lifecycle")


def manifests() -> list[dict[str, Any]]:
    out = []
    for name in SHIPPED:
        m = tomllib.loads((SAMPLES / name / "manifest.toml").read_text(encoding="utf-8"))
        m["dir"] = SAMPLES / name
        out.append(m)
    return out


MANIFESTS = manifests()
CASES = [(m, s) for m in MANIFESTS for s in m["sample"]]


def private_keys(tmp: Path) -> Path:
    """The demo keys, copied with the mode a secret file must have (git keeps 0644)."""
    keys = tmp / "keys"
    shutil.copytree(SAMPLES / "keys", keys)
    for f in keys.iterdir():
        f.chmod(0o600)
    return keys


@pytest.fixture(scope="module")
def profile_set(tmp_path_factory: pytest.TempPathFactory) -> ProfileSet:
    keys = private_keys(tmp_path_factory.mktemp("samples"))
    return ProfileSet.load(
        PROFILES,
        gateway_id=MANIFESTS[0]["gateway_id"],
        keys_dir=keys,
        pseudonym_key_file=keys / "pseudonym.key",
        enforce_rate_limits=False,
    )


def outcome(ps: ProfileSet, m: dict[str, Any], s: dict[str, Any]) -> tuple[str, Any]:
    payload = (m["dir"] / s["file"]).read_bytes()
    try:
        return "ok", ps.decode(None, s["topic"], payload, m["received_ms"], "mqtt")
    except Rejected as r:
        return r.reason, r


def test_every_shipped_profile_has_valid_and_invalid_samples() -> None:
    for m in MANIFESTS:
        expects = [s["expect"] for s in m["sample"]]
        assert expects.count("ok") >= 3, m["profile"]
        assert len([e for e in expects if e != "ok"]) >= 8, m["profile"]
        assert "conflicting_duplicate" in expects, m["profile"]
        assert set(expects) - {"ok"} <= set(REASONS)


@pytest.mark.parametrize(
    ("m", "s"), CASES, ids=[f"{m['profile']}/{s['file']}->{s['expect']}" for m, s in CASES]
)
def test_sample_has_its_documented_outcome(
    profile_set: ProfileSet, m: dict[str, Any], s: dict[str, Any]
) -> None:
    got, value = outcome(profile_set, m, s)
    want = "ok" if s["expect"] == "conflicting_duplicate" else s["expect"]
    assert got == want, value
    if s["expect"] == "ok":
        assert tx_id(value.leaf) == s["tx_id"]
        from gateway._pb.edgegateway.v1 import transaction_pb2

        tx = transaction_pb2.Transaction.FromString(value.leaf)
        assert tx.fields.decode("utf-8") == s["fields"]
        assert tx.profile == m["profile"]


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: f"{c['profile']}/{c['sample']}")
def test_leaf_vector(profile_set: ProfileSet, case: dict[str, Any]) -> None:
    inc = profile_set.decode(
        None,
        case["topic"],
        bytes.fromhex(case["payload_hex"]),
        case["received_ms"],
        case["channel"],
    )
    assert inc.leaf.hex() == case["leaf_hex"]
    assert tx_id(inc.leaf) == case["tx_id"]


def test_same_payload_gives_same_leaf_bytes_every_time(profile_set: ProfileSet) -> None:
    for case in VECTORS["cases"]:
        payload = bytes.fromhex(case["payload_hex"])
        leaves = {
            profile_set.decode(None, case["topic"], payload, case["received_ms"], "mqtt").leaf
            for _ in range(3)
        }
        assert len(leaves) == 1


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    cfg = SpoolConfig(
        path=tmp_path / "spool.db",
        group_commit_max=100,
        group_commit_wait_ms=0,
        max_depth=1000,
        min_free_bytes=0,
        max_pending_age_s=600,
        retention_batches=0,
    )
    sp = Spool(cfg, MANIFESTS[0]["gateway_id"])
    sp.open()
    try:
        yield sp
    finally:
        sp.close()


def _submit(intake: Intake, topic: str, payload: bytes) -> tuple[AppendResult, Rejected | None]:
    fut: Future[tuple[AppendResult, Rejected | None]] = Future()

    def done(res: AppendResult | BaseException, rej: Rejected | None) -> None:
        assert not isinstance(res, BaseException)
        fut.set_result((res, rej))

    intake.submit("ingest-level-id", topic, payload, "mqtt", done)
    return fut.result(timeout=30)


@pytest.mark.parametrize("m", MANIFESTS, ids=lambda m: m["profile"])
def test_seq_seen_with_other_content_is_a_conflicting_duplicate_in_the_spool(
    tmp_path: Path, spool: Spool, m: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The samples' device times sit just before their received_ms; intake stamps now.
    monkeypatch.setattr("gateway.edge.ingest.now_ms", lambda: m["received_ms"])
    keys = private_keys(tmp_path)
    ps = ProfileSet.load(
        PROFILES,
        gateway_id=m["gateway_id"],
        keys_dir=keys,
        pseudonym_key_file=keys / "pseudonym.key",
        enforce_rate_limits=False,
    )
    letters: list[tuple[str, bytes]] = []
    intake = Intake(spool, ps, "devices/rejected", lambda _id, t, msg: letters.append((t, msg)))
    for s in m["sample"]:
        if s["expect"] != "conflicting_duplicate":
            continue
        first = next(x for x in m["sample"] if x["file"] == s["after"])
        before = (m["dir"] / first["file"]).read_bytes()
        res, rej = _submit(intake, first["topic"], before)
        assert rej is None and res.outcome.value == "stored"
        res, rej = _submit(intake, first["topic"], before)
        assert rej is None and res.outcome.value == "duplicate"
        res, rej = _submit(intake, s["topic"], (m["dir"] / s["file"]).read_bytes())
        assert rej is not None and rej.reason == "conflicting_duplicate"
        letter = json.loads(letters[-1][1])
        assert letter["reason"] == "conflicting_duplicate"


def test_rejection_reaches_the_dead_letter_topic_with_its_reason(
    tmp_path: Path, spool: Spool
) -> None:
    keys = private_keys(tmp_path)
    ps = ProfileSet.load(
        PROFILES,
        gateway_id="edge-sample-01",
        keys_dir=keys,
        pseudonym_key_file=keys / "pseudonym.key",
    )
    letters: list[tuple[str, bytes]] = []
    intake = Intake(spool, ps, "devices/rejected", lambda _id, t, msg: letters.append((t, msg)))
    payload = (SAMPLES / "cellsite-power" / "one-byte-short.bin").read_bytes()
    _res, rej = _submit(intake, "cellsites/site-sz-0001/power", payload)
    assert rej is not None and rej.reason == "not_decodable"
    letter = json.loads(letters[-1][1])
    assert letter["reason"] == "not_decodable"
    assert "26 bytes" in letter["detail"]
    assert letter["topic"] == "cellsites/site-sz-0001/power"
    assert len(letter["payload_head_b64"]) > 0
