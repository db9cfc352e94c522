"""c2sp.org/tlog-proof@v1 bundles: the encoding, checked against bytes written from the
spec's rules, and offline verification with a log key and an M-of-N witness policy, end to
end over a log built here.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.formats import checkpoint, merkle, note, tlogproof
from gateway.formats.checkpoint import Checkpoint
from gateway.formats.cosignature import Cosigner
from gateway.formats.tlogproof import (
    NotIncluded,
    ProofError,
    QuorumNotMet,
    TlogProof,
    WitnessPolicy,
    parse_tlog_proof,
    verify_tlog_proof,
)

ORIGIN = checkpoint.gateway_origin("ledger.carrier.example", "gw-01")


def _key(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def p256_key(label: str) -> ec.EllipticCurvePrivateKey:
    """TEST ONLY: a P-256 key whose scalar is SHA-256 of a label (mod n)."""
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    return ec.derive_private_key(int.from_bytes(_key(label), "big") % n, ec.SECP256R1())


def digest_signer(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    return lambda d: key.sign(d, ec.ECDSA(Prehashed(hashes.SHA256())))


LOG_KEY = p256_key("log")
LOG = note.EcdsaDigestSigner(ORIGIN, note.spki_der(LOG_KEY.public_key()), digest_signer(LOG_KEY))
WITNESSES = [
    Cosigner(
        checkpoint.witness_name("ledger.carrier.example", f"ledger-{i}"),
        ed25519.Ed25519PrivateKey.from_private_bytes(_key(f"witness {i}")),
    )
    for i in range(1, 4)
]
POLICY = WitnessPolicy(tuple(w.verifier() for w in WITNESSES), 2)


def leaves(n: int) -> list[bytes]:
    return [b"tx-%d" % i for i in range(n)]


def published(n: int, cosigners: list[Cosigner]) -> tuple[merkle.SubtreeHash, bytes]:
    """A log of n leaves: its hash provider and its signed, cosigned checkpoint."""
    hs = [merkle.leaf_hash(x) for x in leaves(n)]
    provider = merkle.subtree_hashes(hs)
    cp = Checkpoint(ORIGIN, n, merkle.root_from_provider(n, provider))
    signed = note.parse_note(checkpoint.sign_checkpoint(cp, [LOG]))
    for i, w in enumerate(cosigners):
        signed = w.cosign(signed, 1_700_000_000 + i)
    return provider, signed.serialise()


# --------------------------------------------------------------------------
# Encoding.
# --------------------------------------------------------------------------

H1, H2 = _key("left sibling"), _key("uncle")
B1, B2 = base64.b64encode(H1).decode(), base64.b64encode(H2).decode()
X = base64.b64encode(b"batch 7").decode()


@pytest.mark.parametrize(
    ("proof", "text"),
    [
        # Header line, optional "extra <base64>", "index <decimal>", one base64 hash a line
        # (leaf's sibling first), an empty line, then the checkpoint verbatim.
        (
            TlogProof(3, (H1, H2), b"a checkpoint\n"),
            f"c2sp.org/tlog-proof@v1\nindex 3\n{B1}\n{B2}\n\na checkpoint\n",
        ),
        (
            TlogProof(17, (H2,), b"cp\n", b"batch 7"),
            f"c2sp.org/tlog-proof@v1\nextra {X}\nindex 17\n{B2}\n\ncp\n",
        ),
        (TlogProof(0, (), b"one\ntwo\n"), "c2sp.org/tlog-proof@v1\nindex 0\n\none\ntwo\n"),
    ],
    ids=["two hashes", "extra data", "no hashes"],
)
def test_serialisation_follows_the_spec(proof: TlogProof, text: str) -> None:
    assert proof.serialise().decode() == text
    assert parse_tlog_proof(text.encode()) == proof


H = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (f"c2sp.org/tlog-proof@v1\nindex 01\n{H}\n\ncp\n", "leading zero"),
        ("c2sp.org/tlog-proof@v1\nindex 18446744073709551615\n\ncp\n", "index past the last leaf"),
        (f"c2sp.org/tlog-proof@v1\nindex 1\n{H[:-1]}\n\ncp\n", "hash without padding"),
        (f"c2sp.org/tlog-proof@v1\nindex 1\n{H}\n", "no empty line"),
        (f"c2sp.org/tlog-proof@v1\nindex 1\n{H}\n\n", "no checkpoint"),
        (f"c2sp.org/tlog-proof@v1\nindex 1\n{H}\n\ncp", "checkpoint without final newline"),
        ("c2sp.org/tlog-proof@v1\r\nindex 1\n\ncp\n", "carriage return"),
        ("c2sp.org/tlog-proof@v2\nindex 1\n\ncp\n", "another version"),
        ("c2sp.org/tlog-proof@v1\nindex 1\nextra AA==\n\ncp\n", "extra after index"),
        ("c2sp.org/tlog-proof@v1\nindex 1\n" + f"{H}\n" * 65 + "\ncp\n", "65 hashes"),
        ("c2sp.org/tlog-proof@v1\nindex \u0661\n\ncp\n", "non-ASCII digit"),
        ("tlog-proof\nindex 1\n\ncp\n", "another first line"),
        ("c2sp.org/tlog-proof@v1\n\n\ncp\n", "no index line"),
        ("c2sp.org/tlog-proof@v1\nindex one\n\ncp\n", "index not a number"),
        ("c2sp.org/tlog-proof@v1\nindex -1\n\ncp\n", "negative index"),
        ("c2sp.org/tlog-proof@v1\nextra ???\nindex 1\n\ncp\n", "extra not base64"),
        ("c2sp.org/tlog-proof@v1\nindex 1\nnot a hash\n\ncp\n", "hash not base64"),
        (
            f"c2sp.org/tlog-proof@v1\nindex 1\n{base64.b64encode(bytes(33)).decode()}\n\ncp\n",
            "33-byte hash",
        ),
    ],
)
def test_strict_encoding_rules(text: str, why: str) -> None:
    with pytest.raises(ProofError):
        parse_tlog_proof(text.encode())


# --------------------------------------------------------------------------
# Verification.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 100, 257])
def test_every_leaf_of_a_log_has_a_verifying_bundle(n: int) -> None:
    provider, signed = published(n, WITNESSES)
    for i in sorted({0, n // 2, n - 1}):
        bundle = tlogproof.make_tlog_proof(i, provider, signed, extra=b"batch 12").serialise()
        got = verify_tlog_proof(bundle, merkle.leaf_hash(leaves(n)[i]), [LOG.verifier()], POLICY)
        assert got.index == i and got.checkpoint.size == n and got.extra == b"batch 12"
        assert [name for name, _ in got.cosigned_by] == [w.name for w in WITNESSES]
        assert [ts for _, ts in got.cosigned_by] == [1_700_000_000, 1_700_000_001, 1_700_000_002]


def test_quorum_counts_distinct_known_witnesses_only() -> None:
    stranger = Cosigner(
        "elsewhere.example/w", ed25519.Ed25519PrivateKey.from_private_bytes(_key("x"))
    )
    provider, signed = published(10, [WITNESSES[0], stranger])
    twice = WITNESSES[0].cosign(note.parse_note(signed), 1_800_000_000)
    twice = note.Note(twice.text, (*twice.signatures, twice.signatures[-1])).serialise()
    for cp in (signed, twice):
        bundle = tlogproof.make_tlog_proof(4, provider, cp)
        with pytest.raises(QuorumNotMet):
            verify_tlog_proof(bundle, merkle.leaf_hash(b"tx-4"), [LOG.verifier()], POLICY)
    one_of_three = WitnessPolicy(POLICY.witnesses, 1)
    got = verify_tlog_proof(
        tlogproof.make_tlog_proof(4, provider, signed),
        merkle.leaf_hash(b"tx-4"),
        [LOG.verifier()],
        one_of_three,
    )
    assert [name for name, _ in got.cosigned_by] == [WITNESSES[0].name]


def test_no_witnesses_is_a_policy_a_caller_can_choose() -> None:
    provider, signed = published(5, [])
    got = verify_tlog_proof(
        tlogproof.make_tlog_proof(2, provider, signed),
        merkle.leaf_hash(b"tx-2"),
        [LOG.verifier()],
        WitnessPolicy((), 0),
    )
    assert got.cosigned_by == ()


def test_each_step_of_verification_fails_on_its_own() -> None:
    provider, signed = published(20, WITNESSES)
    good = tlogproof.make_tlog_proof(11, provider, signed)
    leaf = merkle.leaf_hash(b"tx-11")
    logv = [LOG.verifier()]
    verify_tlog_proof(good, leaf, logv, POLICY)

    with pytest.raises(NotIncluded):
        verify_tlog_proof(good, merkle.leaf_hash(b"tx-12"), logv, POLICY)
    with pytest.raises(NotIncluded):
        verify_tlog_proof(TlogProof(12, good.hashes, good.checkpoint), leaf, logv, POLICY)
    with pytest.raises(NotIncluded):
        verify_tlog_proof(TlogProof(20, good.hashes, good.checkpoint), leaf, logv, POLICY)
    flipped = (bytes([good.hashes[0][0] ^ 1]) + good.hashes[0][1:], *good.hashes[1:])
    with pytest.raises(NotIncluded):
        verify_tlog_proof(TlogProof(11, flipped, good.checkpoint), leaf, logv, POLICY)
    with pytest.raises(checkpoint.WrongOrigin):
        verify_tlog_proof(good, leaf, logv, POLICY, origin=ORIGIN + "-other")
    other = p256_key("another log")
    other_log = note.EcdsaDigestSigner(
        ORIGIN, note.spki_der(other.public_key()), digest_signer(other)
    )
    with pytest.raises(note.UnverifiedNote):
        # Witness lines verify, but no log signature: the log key is required, not just any.
        verify_tlog_proof(good, leaf, [other_log.verifier()], WitnessPolicy((), 0))
    with pytest.raises(ProofError):
        verify_tlog_proof(good, leaf, [other_log.verifier()], POLICY)
    # A known witness whose cosignature fails rejects the whole checkpoint.
    cp = note.parse_note(good.checkpoint)
    last = cp.signatures[-1]
    broken = note.NoteSignature(
        last.name, last.key_id, last.signature[:-1] + bytes([last.signature[-1] ^ 1])
    )
    bad_cp = note.Note(cp.text, (*cp.signatures[:-1], broken)).serialise()
    with pytest.raises(note.InvalidNoteSignature):
        verify_tlog_proof(TlogProof(11, good.hashes, bad_cp), leaf, logv, POLICY)
    # The extra data is not authenticated: it is carried, never trusted.
    other_extra = TlogProof(11, good.hashes, good.checkpoint, b"anything")
    assert verify_tlog_proof(other_extra, leaf, logv, POLICY).extra == b"anything"


def test_policy_and_key_configuration_errors() -> None:
    vs = tuple(w.verifier() for w in WITNESSES)
    with pytest.raises(note.BadKey):
        WitnessPolicy(vs, 4)
    with pytest.raises(note.BadKey):
        WitnessPolicy(vs, -1)
    with pytest.raises(note.BadKey):
        WitnessPolicy((vs[0], vs[0]), 1)
    renamed = type(vs[0])("someone.example/else", vs[0].public_key)
    with pytest.raises(note.BadKey):
        WitnessPolicy((vs[0], renamed), 1)
    provider, signed = published(4, WITNESSES)
    bundle = tlogproof.make_tlog_proof(0, provider, signed)
    with pytest.raises(note.BadKey):
        verify_tlog_proof(bundle, merkle.leaf_hash(b"tx-0"), [], POLICY)
    with pytest.raises(ProofError):
        verify_tlog_proof(bundle, b"short", [LOG.verifier()], POLICY)


def test_a_bundle_is_made_only_against_its_own_tree() -> None:
    small, small_cp = published(6, WITNESSES)
    large, large_cp = published(7, WITNESSES)
    with pytest.raises(ProofError):
        tlogproof.make_tlog_proof(1, small, large_cp)
    # A store that grew past the checkpoint still proves against it.
    bundle = tlogproof.make_tlog_proof(5, large, small_cp)
    assert verify_tlog_proof(bundle, merkle.leaf_hash(b"tx-5"), [LOG.verifier()], POLICY).index == 5
    other = merkle.subtree_hashes([merkle.leaf_hash(b"other-%d" % i) for i in range(6)])
    with pytest.raises(ProofError):
        tlogproof.make_tlog_proof(1, other, small_cp)
    with pytest.raises(IndexError):
        tlogproof.make_tlog_proof(6, small, small_cp)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))), st.data()
)
def test_one_changed_byte_anywhere_in_a_bundle_is_refused(
    ni: tuple[int, int], data: st.DataObject
) -> None:
    n, i = ni
    provider, signed = published(n, WITNESSES)
    bundle = tlogproof.make_tlog_proof(i, provider, signed).serialise()
    all_three = WitnessPolicy(POLICY.witnesses, 3)
    leaf = merkle.leaf_hash(leaves(n)[i])
    assert verify_tlog_proof(bundle, leaf, [LOG.verifier()], all_three).index == i
    # Drawn independently of the bundle's length, which varies with the ECDSA signature.
    pos = data.draw(st.integers(0, 2**20)) % len(bundle)
    changed = (
        bundle[:pos] + bytes([bundle[pos] ^ data.draw(st.integers(1, 255))]) + bundle[pos + 1 :]
    )
    with pytest.raises(note.NoteError):
        verify_tlog_proof(changed, leaf, [LOG.verifier()], all_three)
