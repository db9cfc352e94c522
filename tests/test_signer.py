"""The HSM signer on a real SoftHSM2 token through python-pkcs11."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pkcs11 import Attribute, ObjectClass

from gateway.common.errors import HsmError, HsmPinError
from gateway.edge import signer
from gateway.edge.config import HsmConfig, PinSource
from gateway.formats import batchformat
from gateway.lab.sandbox import SOFTHSM_MODULE, TEST_PIN, Sandbox


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PinSource]:
    # SoftHSM reads its configuration once per process (C_Initialize), so the
    # tests of this module share one token and use a key label each.
    sb = Sandbox(tmp_path_factory.mktemp("hsm"))
    hsm = sb.hsm("signer-test")
    yield PinSource(pin_file=hsm.pin_file, credential=None)
    sb.close()


@pytest.fixture
def hsm_cfg(token: PinSource, request: pytest.FixtureRequest) -> HsmConfig:
    return HsmConfig(
        module=SOFTHSM_MODULE,
        token_label="signer-test",
        key_label=f"batch-{request.node.name}"[:64],
        key_id=b"\x01",
        pin=token,
    )


def test_init_creates_sensitive_non_extractable_key_and_is_idempotent(hsm_cfg: HsmConfig) -> None:
    info = signer.init_key(hsm_cfg, TEST_PIN)
    assert info.sensitive and not info.extractable
    key = batchformat.load_public_key(info.public_pem)
    assert info.key_id == batchformat.key_id_of(key)
    again = signer.init_key(hsm_cfg, TEST_PIN)
    assert again.key_id == info.key_id
    assert signer.key_info(hsm_cfg, TEST_PIN).key_id == info.key_id


def test_private_key_value_cannot_be_read(hsm_cfg: HsmConfig) -> None:
    signer.init_key(hsm_cfg, TEST_PIN)
    lib = pkcs11.lib(str(hsm_cfg.module))
    token = lib.get_token(token_label=hsm_cfg.token_label)
    with token.open(user_pin=TEST_PIN) as session:
        priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=hsm_cfg.key_label)
        assert priv[Attribute.SENSITIVE] is True
        assert priv[Attribute.EXTRACTABLE] is False
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            priv[Attribute.VALUE]


def test_signatures_are_low_s_der_and_verify(hsm_cfg: HsmConfig) -> None:
    info = signer.init_key(hsm_cfg, TEST_PIN)
    key = batchformat.load_public_key(info.public_pem)
    s = signer.Signer(hsm_cfg, TEST_PIN)
    s.start()
    try:
        for i in range(200):
            message = f"checkpoint-{i}".encode()
            sig = s.sign_digest(hashlib.sha256(message).digest()).result(10)
            _r, s_val = decode_dss_signature(sig)
            assert s_val <= batchformat.P256_N // 2
            key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
        assert s.signatures == 200
    finally:
        s.close()
    assert isinstance(key, ec.EllipticCurvePublicKey)


def test_session_is_reopened_after_it_is_invalidated(hsm_cfg: HsmConfig) -> None:
    info = signer.init_key(hsm_cfg, TEST_PIN)
    key = batchformat.load_public_key(info.public_pem)
    s = signer.Signer(hsm_cfg, TEST_PIN)
    s.start()
    try:
        # Close the session under the signer, as an HSM restart would.
        s._call(lambda: s._session.close()).result(10)
        sig = s.sign_digest(hashlib.sha256(b"after").digest()).result(10)
        key.verify(sig, b"after", ec.ECDSA(hashes.SHA256()))
        assert s.reopens == 1 and s.state == "ok"
    finally:
        s.close()


def test_wrong_pin_is_one_attempt_and_a_pin_error(hsm_cfg: HsmConfig) -> None:
    signer.init_key(hsm_cfg, TEST_PIN)
    s = signer.Signer(hsm_cfg, "000000")
    with pytest.raises(HsmPinError, match="refused the PIN"):
        s.start()
    s.close()
    # The token still accepts the right PIN: one wrong attempt did not lock it.
    assert signer.key_info(hsm_cfg, TEST_PIN).sensitive


def test_missing_token_key_and_module_are_clear_errors(hsm_cfg: HsmConfig) -> None:
    with pytest.raises(HsmError, match="no such token"):
        signer.key_info(replace(hsm_cfg, token_label="nope"), TEST_PIN)
    with pytest.raises(HsmError, match="hsm init"):
        signer.key_info(hsm_cfg, TEST_PIN)  # no key created yet
    with pytest.raises(HsmError, match="does not exist"):
        signer.key_info(replace(hsm_cfg, module=Path("/nonexistent/libp11.so")), TEST_PIN)


def test_signer_benchmark_reports_a_rate(hsm_cfg: HsmConfig) -> None:
    signer.init_key(hsm_cfg, TEST_PIN)
    s = signer.Signer(hsm_cfg, TEST_PIN)
    s.start()
    try:
        assert signer.benchmark_signatures(s, 0.2) > 0
    finally:
        s.close()
