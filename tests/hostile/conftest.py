"""One TLS deployment for the hostile suite, certificates issued by its CA, a memory probe."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest
from cryptography import x509

from gateway.lab import pki
from gateway.lab.sandbox import ClientFiles, GatewayProc, Sandbox
from tests.conftest import Deployment, deploy

# An OSS system that is an admin by its SAN URI, not by its subject.
OSS_URI = "spiffe://carrier.example/oss/submitter"
# Calls the hostile gateway's API serves at once.
API_MAX_CONCURRENT = 4


@dataclass
class Hostile:
    sandbox: Sandbox
    deployment: Deployment
    gateway: GatewayProc


@pytest.fixture(scope="package")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """A gateway under mutual TLS whose admins are the operator (by its full DN) and the
    OSS client (by SAN URI), serving at most API_MAX_CONCURRENT calls at once, and one
    ledger node."""
    sb = Sandbox(tmp_path_factory.mktemp("hostile") / "sb")
    try:
        assert sb.pki is not None
        d = deploy(sb, gateway_id="edge-hostile-01", nodes=1, quorum=1)
        operator = sb.pki["operator"].subject
        text = d.config.read_text()
        admins = f'admin_subjects = ["{operator}"]\n'
        assert admins in text
        d.config.write_text(
            text.replace(
                admins,
                f'admin_subjects = ["{operator}", "uri:{OSS_URI}"]\n'
                f"max_concurrent_rpcs = {API_MAX_CONCURRENT}\n",
            )
        )
        yield Hostile(sb, d, d.start_gateway())
    finally:
        sb.close()


def issue(
    sb: Sandbox,
    name: str,
    subject: x509.Name | None = None,
    uri: str | None = None,
) -> ClientFiles:
    """A client certificate from the sandbox's own CA: valid, verified, and not the one a
    role was given. Without `subject`, CN=`name` in the dev organisation."""
    assert sb.pki is not None
    ca = pki.Authority.load(sb.pki.ca.cert, sb.pki.ca.key)
    now = dt.datetime.now(dt.UTC)
    key, cert = ca.issue(
        name,
        server=False,
        hosts=(),
        not_before=now - dt.timedelta(hours=1),
        not_after=now + dt.timedelta(days=1),
        san_uri=uri,
        subject=subject,
    )
    out = sb.root / "issued"
    out.mkdir(exist_ok=True)
    crt, key_path = out / f"{name}.crt", out / f"{name}.key"
    pki.write_cert(crt, cert)
    pki.write_key(key_path, key)
    return ClientFiles(sb.pki.ca.cert, crt, key_path)


class RssPeak:
    """The highest resident set size of a process while the block runs, sampled every
    2 ms (psutil), and what it was before."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.before = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.002)

    def __enter__(self) -> RssPeak:
        self.before = self.process.memory_info().rss
        self.peak = self.before
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.before
