"""The README's install section, run as written on a fresh machine under a real systemd.

A SystemdBox boots systemd as PID 1 over a throwaway copy of this machine's root. Around
it the test builds what a carrier's site provides: Mosquitto (Debian's own unit), three
reference ledger nodes (the shipped edge-ledger-node@ template) and a PKI. Then every `sh`
block of README.md's "Install on an edge server" section runs, in order, with only the
site's values set; the package under test is the .deb `make deb` builds. The broker runs
what the README's `edge-gateway broker config` block writes, in its lab form (the load
comes from `edge-gateway simulate`, one certificate for every device).

Then the shipped unit is exercised for real under load from `edge-gateway simulate`:
READY=1 before `systemctl start` returns, STATUS= in `systemctl status`, logfmt lines in
the journal, the PIN by LoadCredential, SIGKILL and a SIGSTOP (watchdog) restarted,
`systemctl reload` reloading profiles, `systemctl stop` draining, and the exits an operator
must act on (64, 65, 77, 78, 79) left stopped. Across all of it: every acknowledged message
is committed on the ledger nodes at the quorum, and none is applied twice.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.lab import pki as devpki
from tests.systemd_box import BoxCommandError, BoxTimeout, SystemdBox

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
GATEWAY_ID = "edge-box-01"
BROKER_PORT = 8883  # the devices' listener
GATEWAYS_PORT = 8884  # the gateways' listener
# The domain of the log origin the shipped example (and so `config init`) writes.
LOG_DOMAIN = "ledger.carrier.example"
LEDGERS = {"ledger-1": 7101, "ledger-2": 7102, "ledger-3": 7103}
SITE = {
    "GATEWAY_ID": GATEWAY_ID,
    "BROKER": f"127.0.0.1:{GATEWAYS_PORT}",
    "LEDGERS": " ".join(f"{n}=127.0.0.1:{p}" for n, p in LEDGERS.items()),
    "SITE_NETWORKS": "127.0.0.0/8",
}
WORK = "/root/install"  # where the operator has the .deb and the TLS files
GW = "edge-gateway.service"
DEVICES, PER_DEVICE = 20, 150
LOGFMT = re.compile(r'^ts=\S+Z level=(debug|info|warning|error|critical) logger=\S+ msg=("|\S)')


def readme_install_blocks() -> list[str]:
    """The ```sh blocks of README.md's install section, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Install on an edge server\n")
    end = text.index("\n## ", start + 1)
    blocks = re.findall(r"^```sh\n(.*?)^```$", text[start:end], flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 5, "the README's install section lost its shell blocks"
    return blocks


BROKER_DIR = "/etc/mosquitto/edge-gateway"


def configure_broker(box: SystemdBox) -> None:
    """The site's broker operator: the README's files for this gateway, in the lab form
    (the simulator's certificate publishes for every device), into Debian's mosquitto."""
    readme_out = f"{WORK}/broker"
    assert box.exists(f"{readme_out}/edge-gateway.conf"), "the README wrote no broker files"
    box.run(
        "edge-gateway",
        "broker",
        "config",
        "--config",
        "/etc/edge-gateway/gateway.toml",
        "--out",
        BROKER_DIR,
        "--group",
        "mosquitto",
        "--lab-simulator",
        "device-simulator",
    )
    # The lab form is the README's output plus the simulator's entry, nothing else.
    prod = box.read_text(f"{readme_out}/devices.acl")
    lab = box.read_text(f"{BROKER_DIR}/devices.acl")
    assert lab.startswith(prod) and "user device-simulator" in lab[len(prod) :]
    assert "user device-simulator" not in prod and "use_username_as_clientid true" in (
        box.read_text(f"{readme_out}/edge-gateway.conf")
    )
    assert box.read_text(f"{readme_out}/gateways.acl") == box.read_text(
        f"{BROKER_DIR}/gateways.acl"
    )
    box.run(f"install -m 0644 {BROKER_DIR}/edge-gateway.conf /etc/mosquitto/conf.d/")
    box.systemctl("restart", "mosquitto.service")

    def listening() -> bool:
        out = box.run("ss -ltnH").stdout
        return f":{BROKER_PORT} " in out and f":{GATEWAYS_PORT} " in out

    box.wait_for(listening, 30, interval=0.2, what="mosquitto's two listeners")


def ledger_toml(node: str, port: int) -> str:
    return f"""\
[node]
id = "{node}"
listen = "127.0.0.1:{port}"
db_path = "/var/lib/edge-ledger/{node}/ledger.db"
readers = ["CN=operator,O=Edge Gateway Dev PKI"]

[node.tls]
cert_file = "/etc/edge-ledger/tls/ledger.crt"
key_file = "/etc/edge-ledger/tls/ledger.key"
client_ca_file = "/etc/edge-ledger/tls/ca.crt"

[gateways]
"{GATEWAY_ID}" = {{ public_key = "/etc/edge-ledger/gateways/{GATEWAY_ID}.pem", \
client_subject = "CN=edge-gateway,O=Edge Gateway Dev PKI" }}

[witness]
key_file = "/etc/edge-ledger/{node}-witness.key"
log_domain = "{LOG_DOMAIN}"
"""


AUDIT = """\
import json, sqlite3, sys
from collections import Counter
from gateway.formats import batchformat, checkpoint, merkle, note
from gateway._pb.edgegateway.v1 import transaction_pb2

gateway_id, ports = sys.argv[1], json.loads(sys.argv[2])
key = batchformat.load_public_key(open("/etc/edge-gateway/batch-key.pem", "rb").read())
out = {}
for node in ports:
    # The node's copy of the log, read from its database: the leaves it took in with the
    # checkpoints it cosigned, the latest of which must be signed by the gateway's key and
    # have those leaves' root.
    db = sqlite3.connect(f"file:/var/lib/edge-ledger/{node}/ledger.db?mode=ro", uri=True)
    db.execute("BEGIN")
    leaves = [bytes(r[0]) for r in db.execute(
        "SELECT leaf FROM log_leaf WHERE gateway_id = ? ORDER BY idx", (gateway_id,))]
    last = db.execute(
        "SELECT note FROM witness_cosigned ORDER BY size DESC LIMIT 1").fetchone()
    db.close()
    signed = bytes(last[0])
    origin = checkpoint.checkpoint_of(note.parse_note(signed)).origin
    cp = checkpoint.open_checkpoint(
        signed, [note.EcdsaVerifier.from_public_key(origin, key)], origin).checkpoint
    assert cp.size == len(leaves) and cp.root_hash == merkle.root(leaves), node
    seen = Counter()
    for leaf in leaves:
        tx = transaction_pb2.Transaction.FromString(leaf)
        seen[f"{tx.device_id}/{tx.device_seq}"] += 1
    out[node] = {
        "leaves": len(leaves),
        "twice": sum(c - 1 for c in seen.values() if c > 1),
        "keys": sorted(seen),
    }
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def site(deb_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdBox]:
    """A booted box with the site around the gateway, and the README's install done."""
    pki = devpki.make_dev_pki(tmp_path_factory.mktemp("pki"), days=365)
    with SystemdBox(hostname="edge-box") as box:
        # The site: a broker and the PKI's files where an operator would have them.
        box.copy_in(pki.ca.cert, "/etc/mosquitto/certs/ca.crt", mode=0o644)
        box.copy_in(pki["mosquitto"].cert, "/etc/mosquitto/certs/mosquitto.crt", mode=0o644)
        box.copy_in(pki["mosquitto"].key, "/etc/mosquitto/certs/mosquitto.key", mode=0o640)
        box.run("chgrp mosquitto /etc/mosquitto/certs/mosquitto.key")
        box.copy_in(deb_package, f"{WORK}/{deb_package.name}", mode=0o644)
        for issued in (pki.ca, pki["gateway"], pki["gateway-api"], pki["operator"], pki["device"]):
            box.copy_in(issued.cert, f"{WORK}/{issued.cert.name}", mode=0o644)
            if issued is not pki.ca:
                box.copy_in(issued.key, f"{WORK}/{issued.key.name}", mode=0o600)

        blocks = readme_install_blocks()
        variables, steps = blocks[0], blocks[1:]
        ledgers_started = broker_configured = False
        for i, step in enumerate(steps, start=1):
            if "systemctl enable" in step:
                # The site's ledger nodes know this gateway's key before it starts, and
                # its broker runs the configuration written for it.
                assert ledgers_started, "the README starts the gateway before setup made its key"
                assert broker_configured, "the README starts the gateway before the broker step"
                box.drop_in(GW, "[Service]\nWatchdogSec=6\n", name="90-test-watchdog")
            try:
                box.sh(f"cd {WORK}\n{variables}\n{step}", env=SITE, timeout=600)
            except BoxCommandError as e:
                pytest.fail(f"README install block {i} failed:\n{step}\n{e}")
            if not ledgers_started and box.exists("/etc/edge-gateway/batch-key.pem"):
                start_ledgers(box, pki)
                ledgers_started = True
            if "edge-gateway broker config" in step:
                configure_broker(box)
                broker_configured = True
        yield box


def start_ledgers(box: SystemdBox, pki: devpki.DevPki) -> None:
    box.run(
        "install -d -m 0750 -o root -g edge-ledger /etc/edge-ledger/tls /etc/edge-ledger/gateways"
    )
    box.copy_in(pki.ca.cert, "/etc/edge-ledger/tls/ca.crt", mode=0o644)
    box.copy_in(pki["ledger"].cert, "/etc/edge-ledger/tls/ledger.crt", mode=0o644)
    box.copy_in(pki["ledger"].key, "/etc/edge-ledger/tls/ledger.key", mode=0o640)
    box.run("chgrp edge-ledger /etc/edge-ledger/tls/ledger.key")
    box.run(
        f"install -m 0644 /etc/edge-gateway/batch-key.pem "
        f"/etc/edge-ledger/gateways/{GATEWAY_ID}.pem"
    )
    for node, port in LEDGERS.items():
        # Each node cosigns as a witness with a key of its own (the origin's domain is the
        # one `config init` wrote into the gateway's [log] origin).
        key = f"/etc/edge-ledger/{node}-witness.key"
        box.run(
            f"/opt/edge-gateway/bin/edge-gateway ledger-node keygen"
            f" --name {LOG_DOMAIN}/ledger-witness/{node} --out {key}"
            f" && chown edge-ledger:edge-ledger {key}"
        )
        box.write(f"/etc/edge-ledger/{node}.toml", ledger_toml(node, port), mode=0o640)
        box.run(f"chgrp edge-ledger /etc/edge-ledger/{node}.toml")
    box.systemctl("start", *(f"edge-ledger-node@{n}.service" for n in LEDGERS))
    for node, port in LEDGERS.items():
        unit = f"edge-ledger-node@{node}.service"

        def listening(unit: str = unit, port: int = port) -> bool:
            assert box.show(unit, "ActiveState")["ActiveState"] == "active", box.journal(unit)
            return f":{port} " in box.run("ss -ltnH").stdout

        box.wait_for(listening, 30, interval=0.2, what=f"{unit} listening on {port}")


def restarts(box: SystemdBox) -> int:
    return int(box.show(GW, "NRestarts")["NRestarts"])


LAST_STATUS: dict[str, str] = {}


def status_json(box: SystemdBox) -> dict[str, object]:
    out = box.run(
        "edge-gateway",
        "status",
        "--json",
        "--address",
        "127.0.0.1:7443",
        "--ca-file",
        f"{WORK}/ca.crt",
        check=False,
    )
    LAST_STATUS.update(rc=str(out.returncode), out=out.stdout[-2000:], err=out.stderr[-2000:])
    if out.returncode not in (0, 2):
        return {}
    data: dict[str, object] = json.loads(out.stdout)
    return data


def wait_serving(box: SystemdBox, after_restarts: int, timeout: float = 90) -> None:
    def up() -> bool:
        s = box.show(GW, "ActiveState", "SubState", "NRestarts")
        return s["ActiveState"] == "active" and int(s["NRestarts"]) >= after_restarts

    box.wait_for(up, timeout, interval=0.3, what=f"{GW} active after restart {after_restarts}")


def test_readme_install_gives_a_running_service(site: SystemdBox) -> None:
    box = site
    state = box.show(GW, "ActiveState", "SubState", "UnitFileState", "StatusText", "Type")
    assert state["ActiveState"] == "active", box.journal(GW)
    assert state["UnitFileState"] == "enabled" and state["Type"] == "notify"
    # `systemctl start` returned after READY=1: the unit already carries the gateway's status.
    assert "stored" in state["StatusText"] and "mqtt up" in state["StatusText"], state
    status = box.systemctl("status", GW, "--no-pager", check=False).stdout
    assert 'Status: "stored' in status, status
    # The PIN came by LoadCredential: the credential's source is root's alone.
    assert box.run("stat -c %a:%U:%G /etc/edge-gateway/hsm-pin").stdout.strip() == "600:root:root"
    denied = box.run("runuser -u edge-gateway -- cat /etc/edge-gateway/hsm-pin", check=False)
    assert denied.returncode != 0
    assert 'pin_credential = "hsm-pin"' in box.read_text("/etc/edge-gateway/gateway.toml")
    # Owners and modes the package and setup promise.
    assert box.run("stat -c %a:%U:%G /etc/edge-gateway /var/lib/edge-gateway").stdout.split() == [
        "750:root:edge-gateway",
        "700:edge-gateway:edge-gateway",
    ]
    assert box.run("stat -c %U /var/lib/softhsm/tokens/*/token.object").stdout.split() == [
        "edge-gateway"
    ]
    journal = box.journal(GW)
    lines = [ln for ln in journal.splitlines() if ln.startswith("ts=")]
    assert lines, journal
    bad = [ln for ln in lines if not LOGFMT.match(ln)]
    assert not bad, bad[:5]
    assert "Traceback" not in journal
    assert "ready" in journal and "reload done" in journal  # the README's reload


def test_restarts_reload_and_drained_stop_lose_nothing_under_load(site: SystemdBox) -> None:
    box = site
    result: dict[str, str] = {}

    def load() -> None:
        out = box.run(
            "systemd-run",
            "--wait",
            "--pipe",
            "--quiet",
            "--unit=edge-load",
            "--property=Type=exec",
            "edge-gateway",
            "simulate",
            "--host",
            "127.0.0.1",
            "--port",
            str(BROKER_PORT),
            "--ca-file",
            f"{WORK}/ca.crt",
            "--cert-file",
            f"{WORK}/device.crt",
            "--key-file",
            f"{WORK}/device.key",
            "--devices",
            str(DEVICES),
            "--count",
            str(PER_DEVICE),
            "--rate",
            "150",
            "--start-seq",
            "1",
            "--quiet",
            check=False,
            timeout=300,
        )
        result["out"], result["err"], result["rc"] = out.stdout, out.stderr, str(out.returncode)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    time.sleep(3)
    n = restarts(box)
    box.systemctl("kill", "--kill-who=main", "--signal=SIGKILL", GW)
    wait_serving(box, n + 1)
    time.sleep(2)
    n = restarts(box)
    box.systemctl("kill", "--kill-who=main", "--signal=SIGSTOP", GW)
    wait_serving(box, n + 1, timeout=60)
    assert "Watchdog timeout" in box.journal(GW)
    box.systemctl("reload", GW)
    assert box.show(GW, "ActiveState")["ActiveState"] == "active"
    loader.join(timeout=300)
    assert not loader.is_alive(), "simulate did not finish"
    assert result.get("rc") == "0", result
    total = DEVICES * PER_DEVICE
    assert f"published {total} " in result["out"] and f"acknowledged {total}," in result["out"]
    assert "failed 0" in result["out"], result

    def drained() -> bool:
        s = status_json(box)
        return (
            bool(s)
            and s.get("spoolDepth", s.get("spool_depth", 1)) in (0, "0")
            and (
                s.get("lastCommittedSeq", s.get("last_committed_seq"))
                == s.get("lastSignedSeq", s.get("last_signed_seq"))
            )
        )

    try:
        box.wait_for(drained, 120, interval=1, what="every signed batch committed")
    except BoxTimeout as e:
        raise AssertionError(
            f"{e}; last status: {LAST_STATUS}; {box.journal(GW, '-n', '30')}"
        ) from None
    box.systemctl("stop", GW)
    stopped = box.show(GW, "ActiveState", "Result", "ExecMainStatus")
    assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert "stopped:" in box.journal(GW, "-n", "20")
    audit(box, {f"dev-{d:05d}/{s}" for d in range(DEVICES) for s in range(1, PER_DEVICE + 1)})


def audit(box: SystemdBox, acked: set[str]) -> None:
    """Every acknowledged (device, seq) on at least two of three nodes, none twice."""
    box.write("/root/audit.py", AUDIT)
    out = box.run(
        "/opt/edge-gateway/bin/python",
        "/root/audit.py",
        GATEWAY_ID,
        json.dumps(LEDGERS),
        timeout=300,
    )
    nodes = json.loads(out.stdout)
    holders: dict[str, int] = {}
    for node, seen in nodes.items():
        assert seen["twice"] == 0, f"{node} applied {seen['twice']} transactions twice"
        for k in seen["keys"]:
            holders[k] = holders.get(k, 0) + 1
    lost = sorted(k for k in acked if holders.get(k, 0) < 2)
    assert not lost, f"{len(lost)} acknowledged transactions not committed at the quorum"


BREAKS = {
    # exit code: (what breaks it, how it is put right)
    78: (
        "sed -i 's/^max_tx = .*/max_tx = -5/' /etc/edge-gateway/gateway.toml",
        "sed -i 's/^max_tx = .*/max_tx = 500/' /etc/edge-gateway/gateway.toml",
    ),
    79: (
        "mv /etc/edge-gateway/tls/gateway-api.crt /root/gateway-api.crt",
        "mv /root/gateway-api.crt /etc/edge-gateway/tls/gateway-api.crt",
    ),
    77: (
        "cp -p /etc/edge-gateway/hsm-pin /root/hsm-pin && echo 0000 > /etc/edge-gateway/hsm-pin",
        "cp -p /root/hsm-pin /etc/edge-gateway/hsm-pin",
    ),
    65: (
        'cp -p /var/lib/edge-gateway/spool.db /root/spool.db && python3 -c "import sys; '
        "p='/var/lib/edge-gateway/spool.db'; d=bytearray(open(p,'rb').read()); "
        "[d.__setitem__(i, d[i] ^ 0x5A) for i in range(8192, len(d), 331)]; "
        "open(p,'wb').write(d)\"",
        "cp -p /root/spool.db /var/lib/edge-gateway/spool.db",
    ),
    64: (
        "mkdir -p /etc/systemd/system/edge-gateway.service.d && printf '[Service]\\n"
        "ExecStart=\\nExecStart=/opt/edge-gateway/bin/edge-gateway run --no-such-flag\\n' "
        "> /etc/systemd/system/edge-gateway.service.d/95-usage.conf && systemctl daemon-reload",
        "rm /etc/systemd/system/edge-gateway.service.d/95-usage.conf && systemctl daemon-reload",
    ),
}


@pytest.mark.parametrize("code", sorted(BREAKS))
def test_exits_an_operator_must_fix_are_not_restarted(site: SystemdBox, code: int) -> None:
    box = site
    box.systemctl("stop", GW, check=False)
    box.systemctl("reset-failed", GW, check=False)
    breaker, fixer = BREAKS[code]
    box.sh(breaker)
    try:
        box.systemctl("start", GW, check=False, timeout=90)
        box.wait_for(
            lambda: box.show(GW, "ActiveState")["ActiveState"] == "failed",
            30,
            what=f"{GW} failed with {code}",
        )
        time.sleep(3)  # RestartSec=2: a restart would have begun
        s = box.show(GW, "ActiveState", "ExecMainStatus", "NRestarts")
        assert s == {"ActiveState": "failed", "ExecMainStatus": str(code), "NRestarts": "0"}, (
            s,
            box.journal(GW, "-n", "5"),
        )
        last = [
            ln for ln in box.journal(GW, "-n", "30").splitlines() if ln.startswith("edge-gateway: ")
        ]
        assert last, box.journal(GW, "-n", "30")
        assert "Traceback" not in box.journal(GW, "-n", "60")
    finally:
        box.sh(fixer)
        box.systemctl("reset-failed", GW, check=False)
    box.systemctl("start", GW, timeout=120)
    assert box.show(GW, "ActiveState")["ActiveState"] == "active"
