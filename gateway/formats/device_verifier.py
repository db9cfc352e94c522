"""Reference verifier for device receipts: one file, the Python standard library, and one
ECDSA P-256 verify.

A device that published a transaction receives a receipt on its receipt topic (the format
is in gateway/formats/receipt.py). With this file it checks, offline:

1. `verify_receipt`: the receipt's inclusion proof leads from its tx_id to a root, the
   gateway's log key signed the checkpoint of that root, and enough of the ledger nodes
   it trusts (witnesses) cosigned it.
2. `verify_still_included`: later, with a newer checkpoint and a consistency proof fetched
   from any ledger node, that the checkpoint of its last receipt is a prefix of the newer
   one, so its transaction is still in the log.

To use it on a device or in another project, copy this file alone; it imports nothing from
the gateway. A port to C or Rust replaces three pieces: `ecdsa_p256_verify` (the only
call into a crypto library; an MCU's ECC engine or micro-ecc), `ed25519_verify` (pure
Python here, after RFC 8032 section 6; Monocypher or TweetNaCl on a device), and base64
(only for vkeys and note text). Everything else is SHA-256 and byte arithmetic.

Configuration a device holds: its gateway's origin (`<domain>/edge-gateway/<gateway id>`),
the gateway's log public key(s) as DER SubjectPublicKeyInfo (two during a key rotation),
and the witnesses' vkeys (`<name>+<hex key ID>+<base64(0x04 || 32-byte key)>`) with the
number of them that must have cosigned.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

# --------------------------------------------------------------------------
# The one call into a crypto library: replace it on a device.
# --------------------------------------------------------------------------


def ecdsa_p256_verify(spki_der: bytes, message: bytes, signature_der: bytes) -> bool:
    """True if `signature_der` (DER ECDSA) is a valid signature by the P-256 key in
    `spki_der` over SHA-256(message)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_der_public_key(spki_der)
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            return False
        key.verify(signature_der, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


# --------------------------------------------------------------------------
# Ed25519 verification (RFC 8032 section 5.1.7), for witness cosignatures.
# --------------------------------------------------------------------------

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_Point = tuple[int, int, int, int]  # extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z


def _add(p: _Point, q: _Point) -> _Point:
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s: int, p: _Point) -> _Point:
    q: _Point = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _same(p: _Point, q: _Point) -> bool:
    return (p[0] * q[2] - q[0] * p[2]) % _P == 0 and (p[1] * q[2] - q[1] * p[2]) % _P == 0


def _recover_x(y: int, sign: int) -> int | None:
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    if x & 1 != sign:
        x = _P - x
    return x


def _decode_point(s: bytes) -> _Point | None:
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign, y = y >> 255, y & ((1 << 255) - 1)
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
assert _GX is not None
_G: _Point = (_GX, _GY, 1, _GX * _GY % _P)


# A verify is a pure function of its inputs, and a few milliseconds of Python: receipts of
# one checkpoint carry the same cosignatures, so a verifier checking many of them (an
# auditor, the demo) checks each cosignature once. A device keeps one receipt and can drop
# the cache.
@functools.lru_cache(maxsize=256)
def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """RFC 8032 Ed25519 verification: [S]B = R + [SHA-512(R || A || M)]A."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a = _decode_point(public_key)
    r = _decode_point(signature[:32])
    if a is None or r is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False
    k = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little")
    return _same(_mul(s, _G), _add(r, _mul(k % _L, a)))


# --------------------------------------------------------------------------
# RFC 9162 Merkle tree proofs.
# --------------------------------------------------------------------------


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_inclusion_proof(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes]
) -> bytes | None:
    """RFC 9162 2.1.3.2: the root the proof implies, or None if it does not fit."""
    if not 0 <= index < size or len(leaf_hash) != 32:
        return None
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if len(p) != 32 or sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = _node(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def consistent(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> bool:
    """RFC 9162 2.1.4.2: the tree (old_size, old_root) is a prefix of (new_size, new_root)."""
    if not 0 < old_size <= new_size or any(len(p) != 32 for p in proof):
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = _node(c, fr), _node(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = _node(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root


# --------------------------------------------------------------------------
# Keys.
# --------------------------------------------------------------------------


class ReceiptInvalid(Exception):
    """The receipt, checkpoint or proof does not verify; the message says which step."""


@dataclass(frozen=True)
class WitnessKey:
    name: str
    key_id: bytes
    public_key: bytes  # 32-byte Ed25519


def witness_key(vkey: str) -> WitnessKey:
    """A witness from its vkey: type 0x04 (cosignature) or 0x01 (Ed25519 used to cosign)."""
    name, _, rest = vkey.partition("+")
    id_hex, _, encoded = rest.partition("+")
    try:
        stated = bytes.fromhex(id_hex)
        material = base64.b64decode(encoded, validate=True)
    except (ValueError, binascii.Error):
        raise ReceiptInvalid(f"witness vkey {vkey[:60]!r} is malformed") from None
    if not name or len(stated) != 4 or len(material) != 33 or material[0] not in (1, 4):
        raise ReceiptInvalid(f"witness vkey {vkey[:60]!r} is not an Ed25519 key")
    pub = material[1:]
    if stated != hashlib.sha256(name.encode() + b"\n" + material).digest()[:4]:
        raise ReceiptInvalid(f"witness vkey {vkey[:60]!r}: key ID does not match")
    # Cosignatures always carry the type 0x04 key ID.
    return WitnessKey(name, hashlib.sha256(name.encode() + b"\n\x04" + pub).digest()[:4], pub)


@dataclass(frozen=True)
class Trust:
    """What a device is provisioned with."""

    origin: str
    log_keys: tuple[bytes, ...]  # DER SubjectPublicKeyInfo of the gateway's P-256 key(s)
    witnesses: tuple[WitnessKey, ...]
    quorum: int  # witnesses that must have cosigned a receipt's checkpoint

    @classmethod
    def of(
        cls, origin: str, log_keys: Sequence[bytes], witness_vkeys: Sequence[str], quorum: int
    ) -> Trust:
        ws = tuple(witness_key(v) for v in witness_vkeys)
        if not 0 <= quorum <= len(ws) or len({w.public_key for w in ws}) != len(ws):
            raise ReceiptInvalid(f"quorum {quorum} of {len(ws)} distinct witnesses")
        return cls(origin, tuple(log_keys), ws, quorum)

    def log_key_ids(self) -> dict[bytes, bytes]:
        # The ECDSA note key ID: SHA-256 of the DER SPKI, first 4 bytes (c2sp.org/signed-note).
        return {hashlib.sha256(k).digest()[:4]: k for k in self.log_keys}


# --------------------------------------------------------------------------
# Checkpoints and their signatures.
# --------------------------------------------------------------------------


def checkpoint_body(origin: str, size: int, root: bytes) -> bytes:
    """c2sp.org/tlog-checkpoint: origin, decimal size, base64 root, each line ending in \\n."""
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n".encode()


def cosigned_message(timestamp: int, body: bytes) -> bytes:
    """c2sp.org/tlog-cosignature: what a witness's Ed25519 key signs."""
    return b"cosignature/v1\ntime " + str(timestamp).encode() + b"\n" + body


def check_signatures(
    body: bytes, signatures: Sequence[tuple[bytes, bytes]], trust: Trust, quorum: int
) -> list[tuple[str, int]]:
    """The note rules over (key ID, signature) pairs: signatures from unknown key IDs are
    ignored; one from a known key that fails rejects everything; a log key must have
    signed; at least `quorum` distinct trusted witnesses must have cosigned. Returns
    (witness name, cosignature time) for each witness that did."""
    log_keys = trust.log_key_ids()
    witnesses = {w.key_id: w for w in trust.witnesses}
    logged = False
    cosigned: dict[bytes, tuple[str, int]] = {}
    for kid, sig in signatures:
        if kid in log_keys:
            if not ecdsa_p256_verify(log_keys[kid], body, sig):
                raise ReceiptInvalid("the gateway's signature on the checkpoint is invalid")
            logged = True
        elif kid in witnesses:
            w = witnesses[kid]
            if len(sig) != 72:
                raise ReceiptInvalid(f"cosignature by {w.name} is not 72 bytes")
            ts = struct.unpack(">Q", sig[:8])[0]
            if ts >= 2**63 or not ed25519_verify(w.public_key, cosigned_message(ts, body), sig[8:]):
                raise ReceiptInvalid(f"cosignature by {w.name} is invalid")
            cosigned[w.public_key] = (w.name, ts)
    if not logged:
        raise ReceiptInvalid("the checkpoint is not signed by a log key of the gateway")
    if len(cosigned) < quorum:
        raise ReceiptInvalid(f"{len(cosigned)} trusted witnesses cosigned, {quorum} required")
    return sorted(cosigned.values())


# --------------------------------------------------------------------------
# Receipts.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    tx_id: bytes
    index: int
    size: int
    proof: tuple[bytes, ...]
    signatures: tuple[tuple[bytes, bytes], ...]


def parse_receipt(data: bytes) -> Receipt:
    """The binary receipt (version 1); ReceiptInvalid on any deviation."""
    if not 51 <= len(data) <= 6259:  # 49 + 1 + 64 * 32 + 1 + 16 * (5 + 255)
        raise ReceiptInvalid(f"receipt is {len(data)} bytes")
    version, tx_id, index, size = struct.unpack_from(">B32sQQ", data)
    if version != 1:
        raise ReceiptInvalid(f"receipt version {version}, expected 1")
    pos = 49
    n = data[pos]
    pos += 1
    if n > 64 or len(data) < pos + 32 * n + 1:
        raise ReceiptInvalid("receipt truncated in its inclusion proof")
    proof = tuple(data[pos + 32 * i : pos + 32 * i + 32] for i in range(n))
    pos += 32 * n
    m = data[pos]
    pos += 1
    sigs = []
    for _ in range(m):
        if len(data) < pos + 5 or len(data) < pos + 5 + data[pos + 4]:
            raise ReceiptInvalid("receipt truncated in its signatures")
        length = data[pos + 4]
        sigs.append((data[pos : pos + 4], data[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    if pos != len(data) or m == 0:
        raise ReceiptInvalid("receipt has no signature or bytes after the last one")
    return Receipt(tx_id, index, size, proof, tuple(sigs))


@dataclass(frozen=True)
class Verified:
    tx_id: bytes
    index: int
    size: int
    root: bytes
    cosigned_by: list[tuple[str, int]]  # (witness name, cosignature time)


def verify_receipt(data: bytes, trust: Trust, tx_id: bytes | None = None) -> Verified:
    """Check a receipt offline. `tx_id`, if given, must be the receipt's (a device that
    computed its own leaf hash)."""
    r = parse_receipt(data)
    if tx_id is not None and tx_id != r.tx_id:
        raise ReceiptInvalid("the receipt is for another transaction")
    root = root_from_inclusion_proof(r.tx_id, r.index, r.size, r.proof)
    if root is None:
        raise ReceiptInvalid("the inclusion proof does not fit the index and tree size")
    # The body the log signed, rebuilt with the root the proof implies: the log's signature
    # verifies only if the transaction is in the tree it signed.
    cosigned = check_signatures(
        checkpoint_body(trust.origin, r.size, root), r.signatures, trust, trust.quorum
    )
    return Verified(r.tx_id, r.index, r.size, root, cosigned)


# --------------------------------------------------------------------------
# Later: is the transaction still in the log?
# --------------------------------------------------------------------------


def parse_signed_checkpoint(note: bytes) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    """A signed checkpoint note as a ledger node serves it: (body, size, root, signatures)."""
    if len(note) > 256 * 1024:
        raise ReceiptInvalid("checkpoint note is too large")
    body, sep, block = note.rpartition(b"\n\n")
    if not sep or not block.endswith(b"\n"):
        raise ReceiptInvalid("not a signed note")
    body += b"\n"
    lines = body.split(b"\n")
    if len(lines) != 4:  # origin, size, root, and the empty string after the last newline
        raise ReceiptInvalid("checkpoint body is not three lines")
    size_text, root_text = lines[1], lines[2]
    if not size_text.isdigit() or (size_text.startswith(b"0") and size_text != b"0"):
        raise ReceiptInvalid("checkpoint size is not a decimal")
    try:
        root = base64.b64decode(root_text, validate=True)
    except binascii.Error:
        raise ReceiptInvalid("checkpoint root is not base64") from None
    if len(root) != 32:
        raise ReceiptInvalid("checkpoint root is not 32 bytes")
    sigs = []
    for line in block[:-1].split(b"\n"):
        name, sp, encoded = line.removeprefix("\u2014 ".encode()).partition(b" ")
        if not line.startswith("\u2014 ".encode()) or not sp or not name:
            raise ReceiptInvalid("malformed signature line")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise ReceiptInvalid("signature line is not base64") from None
        if len(raw) < 5:
            raise ReceiptInvalid("signature line too short")
        sigs.append((raw[:4], raw[4:]))
    return body, int(size_text), root, sigs


def parse_proof_lines(text: bytes) -> list[bytes]:
    """A consistency proof as one base64 hash per line."""
    out = []
    for line in text.split(b"\n"):
        if line:
            try:
                out.append(base64.b64decode(line, validate=True))
            except binascii.Error:
                raise ReceiptInvalid("consistency proof line is not base64") from None
    if len(out) > 64:
        raise ReceiptInvalid("consistency proof has more than 64 hashes")
    return out


def verify_still_included(
    receipt: bytes,
    newer_checkpoint: bytes,
    consistency_proof: Sequence[bytes],
    trust: Trust,
    quorum: int = 1,
) -> int:
    """The receipt verifies, the newer checkpoint is signed by the gateway and cosigned by
    at least `quorum` trusted witnesses (a ledger node serves its own cosignature), and the
    consistency proof shows the receipt's tree is a prefix of it. Returns the newer size."""
    old = verify_receipt(receipt, trust)
    body, size, root, sigs = parse_signed_checkpoint(newer_checkpoint)
    if body != checkpoint_body(trust.origin, size, root):
        raise ReceiptInvalid("the newer checkpoint is for another log")
    check_signatures(body, sigs, trust, quorum)
    if size < old.size:
        raise ReceiptInvalid(f"the newer checkpoint ({size}) is smaller than the receipt's")
    if not consistent(old.size, size, consistency_proof, old.root, root):
        raise ReceiptInvalid(
            f"the log of size {size} does not extend the receipt's tree of size {old.size}"
        )
    return size
