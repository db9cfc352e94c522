"""The HSM: checkpoint signatures from a key that never leaves PKCS#11.

Every PKCS#11 call runs on one worker thread through one session (python-pkcs11
failed with GeneralError when two threads signed at once). SHA-256 is computed
in software and CKM_ECDSA signs the digest inside the token; the raw r||s
becomes low-S DER so `openssl dgst -sha256 -verify` accepts it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from gateway.common.errors import HsmError, HsmPinError
from gateway.edge import metrics
from gateway.edge.config import HsmConfig
from gateway.formats import batchformat, checkpoint, note

log = logging.getLogger("gateway.edge.signer")
T = TypeVar("T")

# Errors after which the session is worth reopening once.
_REOPEN = (
    p11.SessionClosed,
    p11.SessionHandleInvalid,
    p11.DeviceError,
    p11.DeviceRemoved,
    p11.TokenNotPresent,
    p11.UserNotLoggedIn,
    p11.GeneralError,
    # The token's objects went away under the session (token reset or restored).
    p11.ObjectHandleInvalid,
    p11.KeyHandleInvalid,
)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    token_label: str
    token_serial: str
    token_model: str
    key_label: str
    cka_id: bytes
    key_id: bytes  # SHA-256 of SubjectPublicKeyInfo DER
    public_pem: bytes
    sensitive: bool
    extractable: bool


def _load_lib(module: Path) -> Any:
    if not module.exists():
        raise HsmError(
            f"hsm.module {module} does not exist: install the HSM's PKCS#11 library "
            "(SoftHSM2: apt-get install softhsm2) or fix the path"
        )
    try:
        return pkcs11.lib(str(module))
    except (RuntimeError, OSError) as e:
        raise HsmError(f"hsm.module {module} cannot be loaded as a PKCS#11 library: {e}") from None


def _get_token(lib: Any, label: str, module: Path) -> Any:
    try:
        return lib.get_token(token_label=label)
    except p11.NoSuchToken:
        raise HsmError(
            f"hsm.token_label {label!r}: no such token in {module}: initialise it "
            "(softhsm2-util --init-token --free --label ...) or fix the label"
        ) from None
    except p11.MultipleTokensReturned:
        raise HsmError(
            f"hsm.token_label {label!r} matches several tokens: make it unique"
        ) from None


def _open(token: Any, pin: str, rw: bool = False) -> Any:
    try:
        return token.open(user_pin=pin, rw=rw)
    except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
        # One attempt only: real HSMs lock a token after a few wrong PINs.
        raise HsmPinError(
            f"HSM token {token.label!r} refused the PIN: check the PIN file or credential; "
            "not retried, since tokens lock after repeated failures"
        ) from None
    except p11.PinLocked:
        raise HsmPinError(f"HSM token {token.label!r}: the user PIN is locked") from None
    except (p11.TokenNotPresent, p11.DeviceError, p11.DeviceRemoved) as e:
        raise HsmError(f"HSM token {token.label!r} is not usable: {type(e).__name__}") from None


def key_config(cfg: HsmConfig, label: str, cka_id: bytes) -> HsmConfig:
    """The same token with another key pair (a rotation's key)."""
    return replace(cfg, key_label=label, key_id=cka_id)


def rotation_key(cfg: HsmConfig, number: int) -> HsmConfig:
    """Rotation `number`'s key pair: label `<key_label>.<number>`, CKA_ID the configured
    one followed by the number (two bytes), so no two keys of the log share either."""
    return key_config(cfg, f"{cfg.key_label}.{number}", cfg.key_id + number.to_bytes(2, "big"))


def _find_private(session: Any, cfg: HsmConfig) -> Any:
    try:
        return session.get_key(
            object_class=ObjectClass.PRIVATE_KEY,
            key_type=KeyType.EC,
            label=cfg.key_label,
            id=cfg.key_id,
        )
    except p11.NoSuchKey:
        raise HsmError(
            f"hsm.key_label {cfg.key_label!r} (CKA_ID {cfg.key_id.hex()}) not found on token "
            f"{cfg.token_label!r}: run `edge-gateway hsm init`"
        ) from None


def _find_public(session: Any, cfg: HsmConfig) -> Any:
    try:
        return session.get_key(
            object_class=ObjectClass.PUBLIC_KEY,
            key_type=KeyType.EC,
            label=cfg.key_label,
            id=cfg.key_id,
        )
    except p11.NoSuchKey:
        raise HsmError(
            f"public key {cfg.key_label!r} (CKA_ID {cfg.key_id.hex()}) not found on token "
            f"{cfg.token_label!r}: run `edge-gateway hsm init`"
        ) from None


def _key_info(token: Any, cfg: HsmConfig, pub: Any, priv: Any) -> KeyInfo:
    spki = encode_ec_public_key(pub)
    key = serialization.load_der_public_key(spki)
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyInfo(
        token_label=token.label,
        token_serial=token.serial.decode("ascii", "replace")
        if isinstance(token.serial, bytes)
        else str(token.serial),
        token_model=str(token.model),
        key_label=cfg.key_label,
        cka_id=cfg.key_id,
        key_id=hashlib.sha256(spki).digest(),
        public_pem=pem,
        sensitive=bool(priv[Attribute.SENSITIVE]),
        extractable=bool(priv[Attribute.EXTRACTABLE]),
    )


def init_key(cfg: HsmConfig, pin: str) -> KeyInfo:
    """Create the P-256 signing key pair on the token (idempotent: an existing key is kept)."""
    lib = _load_lib(cfg.module)
    token = _get_token(lib, cfg.token_label, cfg.module)
    with _open(token, pin, rw=True) as session:
        try:
            priv = session.get_key(
                object_class=ObjectClass.PRIVATE_KEY,
                key_type=KeyType.EC,
                label=cfg.key_label,
                id=cfg.key_id,
            )
            pub = _find_public(session, cfg)
            log.info("hsm key %s already exists; kept", cfg.key_label)
        except p11.NoSuchKey:
            params = session.create_domain_parameters(
                KeyType.EC,
                {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                local=True,
            )
            pub, priv = params.generate_keypair(
                store=True,
                label=cfg.key_label,
                id=cfg.key_id,
                public_template={Attribute.VERIFY: True, Attribute.TOKEN: True},
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SIGN: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                },
            )
        return _key_info(token, cfg, pub, priv)


def key_info(cfg: HsmConfig, pin: str) -> KeyInfo:
    lib = _load_lib(cfg.module)
    token = _get_token(lib, cfg.token_label, cfg.module)
    with _open(token, pin) as session:
        return _key_info(token, cfg, _find_public(session, cfg), _find_private(session, cfg))


_STOP = object()


class Signer:
    """Owns the HSM session on its own thread; sign() returns a Future of DER bytes.

    It holds the configured key (hsm.key_label, hsm.key_id) or, after a key rotation
    (gateway.edge.rotation), the keys the log signs with, each by its CKA_ID; `info` is
    the first one's."""

    def __init__(
        self, cfg: HsmConfig, pin: str, keys: Sequence[tuple[str, bytes]] | None = None
    ) -> None:
        self._cfg = cfg
        self._pin = pin
        # (label, CKA_ID) of every key to hold, the first one's info in self.info.
        self._specs: list[tuple[str, bytes]] = list(keys or [(cfg.key_label, cfg.key_id)])
        self._keys: dict[bytes, Any] = {}
        self.infos: dict[bytes, KeyInfo] = {}
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1024)
        self._thread = threading.Thread(target=self._run, name="hsm", daemon=True)
        self._lib: Any = None
        self._token: Any = None
        self._session: Any = None
        self._key: Any = None
        self.info: KeyInfo | None = None
        self.state = "closed"
        self.signatures = 0
        self.reopens = 0

    def start(self) -> KeyInfo:
        """Open the session and find the key, on the worker thread. Raises HsmError."""
        self._thread.start()
        return self._call(self._open_session).result()

    def _open_session(self) -> KeyInfo:
        if self._lib is None:
            self._lib = _load_lib(self._cfg.module)
        self._token = _get_token(self._lib, self._cfg.token_label, self._cfg.module)
        self._session = _open(self._token, self._pin)
        self._keys = {}
        for label, cka_id in self._specs:
            self._load(label, cka_id)
        self._key = self._keys[self._specs[0][1]]
        self.info = self.infos[self._specs[0][1]]
        self.state = "ok"
        return self.info

    def _load(self, label: str, cka_id: bytes) -> KeyInfo:
        cfg = key_config(self._cfg, label, cka_id)
        priv = _find_private(self._session, cfg)
        info = _key_info(self._token, cfg, _find_public(self._session, cfg), priv)
        if info.extractable or not info.sensitive:
            raise HsmError(
                f"hsm key {label!r} is extractable or not sensitive: "
                "refusing to sign with it; create a new key with `edge-gateway hsm init`"
            )
        self._keys[cka_id] = priv
        self.infos[cka_id] = info
        return info

    def load_key(self, label: str, cka_id: bytes) -> Future[KeyInfo]:
        """Hold one more key (a rotation's new key), kept across session reopens."""

        def load() -> KeyInfo:
            if self._session is None:
                self._reopen("unavailable")
            info = self._load(label, cka_id)
            if (label, cka_id) not in self._specs:
                self._specs.append((label, cka_id))
            return info

        return self._call(load)

    def retire_key(self, label: str, cka_id: bytes) -> Future[None]:
        """A rotation's old key: CKA_SIGN false on the token (it signs nothing more), kept
        with its public key; no longer held here."""

        def retire() -> None:
            cfg = key_config(self._cfg, label, cka_id)
            # The token is logged in for this application: a read-write session needs no PIN.
            with self._token.open(rw=True) as rw:
                _find_private(rw, cfg)[Attribute.SIGN] = False
            self._keys.pop(cka_id, None)
            self._specs = [s for s in self._specs if s[1] != cka_id] or self._specs

        return self._call(retire)

    def _close_session(self) -> None:
        if self._session is not None:
            with contextlib.suppress(p11.PKCS11Error):
                self._session.close()
        self._session = None
        self._key = None
        self._keys = {}

    def _held(self, cka_id: bytes | None) -> Any:
        key = self._key if cka_id is None else self._keys.get(cka_id)
        if key is None and cka_id is not None and self._session is not None:
            raise HsmError(f"hsm key with CKA_ID {cka_id.hex()} is not held by the signer")
        return key

    def _sign_now(self, digest: bytes, cka_id: bytes | None = None) -> bytes:
        if self._held(cka_id) is None:
            # The last reopen failed; try again now (the batcher paces the attempts).
            self._reopen("unavailable")
            return self._finish(self._held(cka_id).sign(digest, mechanism=Mechanism.ECDSA))
        try:
            raw = self._held(cka_id).sign(digest, mechanism=Mechanism.ECDSA)
        except _REOPEN as e:
            # Session invalidated (token removed, HSM restarted): reopen once, then retry.
            log.warning("hsm session lost (%s); reopening", type(e).__name__)
            self._reopen(type(e).__name__)
            raw = self._held(cka_id).sign(digest, mechanism=Mechanism.ECDSA)
        return self._finish(raw)

    def _reopen(self, why: str) -> None:
        self.state = f"reopening after {why}"
        self._close_session()
        self.reopens += 1
        try:
            # Modules such as SoftHSM and YubiHSM cache their slot list until
            # C_Finalize/C_Initialize; without it a token that came back stays unseen.
            if self._lib is not None:
                self._lib.reinitialize()
            self._open_session()
        except p11.PKCS11Error as e:
            self._close_session()
            self.state = "unavailable"
            raise HsmError(
                f"HSM token {self._cfg.token_label!r} unavailable: {type(e).__name__}"
            ) from None
        except HsmError:
            self._close_session()
            self.state = "unavailable"
            raise
        log.info("hsm session reopened")

    def _finish(self, raw: Any) -> bytes:
        self.signatures += 1
        metrics.hsm_signatures.inc()
        return batchformat.der_low_s(bytes(raw))

    def sign_digest(self, digest: bytes) -> Future[bytes]:
        return self._call(lambda: self._sign_now(digest))

    def note_signer(self, name: str, cka_id: bytes | None = None) -> note.EcdsaDigestSigner:
        """A signed-note signer (type 0x02, ECDSA) named `name` over an HSM key. Its
        sign() signs on the calling thread: call it through sign_checkpoint, which runs
        it on the HSM worker."""
        info = self.info if cka_id is None else self.infos.get(cka_id)
        if info is None:
            raise HsmError("hsm signer not started or key not held")
        spki = serialization.load_pem_public_key(info.public_pem).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return note.EcdsaDigestSigner(name, spki, lambda d: self._sign_now(d, cka_id))

    def sign_checkpoint(
        self, cp: checkpoint.Checkpoint, cka_ids: Sequence[bytes | None] = (None,)
    ) -> Future[bytes]:
        """The signed note of a checkpoint, signed by the HSM key(s) `cka_ids` in that
        order under the checkpoint's origin as key name (c2sp.org/tlog-checkpoint; during
        a key rotation's overlap the old key and the new one), on the HSM worker."""

        def sign() -> bytes:
            try:
                return checkpoint.sign_checkpoint(
                    cp, [self.note_signer(cp.origin, k) for k in cka_ids]
                )
            except note.SignerFailed as e:
                raise HsmError(f"HSM signature of checkpoint {cp.size} unusable: {e}") from None

        return self._call(sign)

    def _call(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._queue.put((fn, fut))
        return fut

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                self._close_session()
                self.state = "closed"
                return
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except (HsmError, p11.PKCS11Error, ValueError) as e:
                if isinstance(e, p11.PKCS11Error):
                    self.state = f"error: {type(e).__name__}"
                    e = HsmError(f"HSM call failed: {type(e).__name__}")
                fut.set_exception(e)

    def close(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)


def benchmark_signatures(signer: Signer, seconds: float = 1.0) -> float:
    """Signatures per second on one session (used by `make bench`)."""
    digest = hashlib.sha256(b"bench").digest()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        signer.sign_digest(digest).result()
        n += 1
    return n / (time.perf_counter() - t0)
