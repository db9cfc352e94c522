"""RFC 9162 consistency proofs (2.1.4) and proofs from a subtree-hash provider.

Checked two ways: against MTH and SUBPROOF transcribed recursively from the RFC below, and
by properties over random trees (every proof verifies, every tampered one fails).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.formats import merkle

# --------------------------------------------------------------------------
# Reference: RFC 9162 2.1.4.1, transcribed recursively.
# --------------------------------------------------------------------------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(hashes: Sequence[bytes]) -> bytes:
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = _k(len(hashes))
    return hashlib.sha256(b"\x01" + ref_mth(hashes[:k]) + ref_mth(hashes[k:])).digest()


def ref_subproof(m: int, hashes: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(hashes)
    if m == n:
        return [] if b else [ref_mth(hashes)]
    k = _k(n)
    if m <= k:
        return [*ref_subproof(m, hashes[:k], b), ref_mth(hashes[k:])]
    return [*ref_subproof(m - k, hashes[k:], False), ref_mth(hashes[:k])]


def ref_proof(m: int, hashes: Sequence[bytes]) -> list[bytes]:
    return ref_subproof(m, hashes, True)


def hashes_of(n: int) -> list[bytes]:
    return [merkle.leaf_hash(b"leaf-%d" % i) for i in range(n)]


# --------------------------------------------------------------------------
# A small tree, node by node, against the reference.
# --------------------------------------------------------------------------

# Leaf data of different lengths, the empty string included.
LEAVES = [b"", b"\x00", b"\x01\x02", b"abc", b"leaf four", b"\xff" * 5, b"six", b"7" * 64, b"8"]


def test_small_tree_node_hashes_are_what_the_provider_gives() -> None:
    hs = [merkle.leaf_hash(d) for d in LEAVES]
    assert hs[0] == hashlib.sha256(b"\x00").digest()  # RFC 9162 2.1.1: MTH({d(0)})
    provide = merkle.subtree_hashes(hs)
    for level in range(4):
        width = 2**level
        for index in range(len(hs) // width):
            want = ref_mth(hs[index * width : (index + 1) * width])
            assert provide(level, index) == want
    with pytest.raises(IndexError):
        provide(0, len(LEAVES))
    with pytest.raises(IndexError):
        provide(4, 0)


def test_small_tree_roots_from_the_provider_and_from_leaf_data() -> None:
    hs = [merkle.leaf_hash(d) for d in LEAVES]
    provide = merkle.subtree_hashes(hs)
    for size in range(len(LEAVES) + 1):
        want = ref_mth(hs[:size])
        assert merkle.root_from_provider(size, provide) == want
        assert merkle.root(LEAVES[:size]) == want


def test_small_tree_proofs_from_leaf_data_and_provider_are_the_rfc_ones() -> None:
    hs = [merkle.leaf_hash(d) for d in LEAVES]
    for n in range(1, len(LEAVES) + 1):
        provide = merkle.subtree_hashes(hs[:n])
        for m in range(1, n + 1):
            assert merkle.consistency_proof(LEAVES[:n], m) == ref_proof(m, hs[:n])
            assert merkle.consistency_proof_from_provider(m, n, provide) == ref_proof(m, hs[:n])
        for i in range(n):
            got = merkle.inclusion_proof_from_provider(i, n, provide)
            assert got == merkle.inclusion_proof(LEAVES[:n], i)
            assert merkle.verify_inclusion(LEAVES[i], i, n, got, ref_mth(hs[:n]))


# --------------------------------------------------------------------------
# Edge cases of the definition.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(("m", "n"), [(0, 0), (0, 5), (5, 4), (-1, 3)])
def test_no_proof_outside_zero_less_than_old_size_at_most_new_size(m: int, n: int) -> None:
    with pytest.raises(ValueError):
        merkle.consistency_proof_from_hashes(hashes_of(max(n, 0)), m)


def test_equal_sizes_take_an_empty_proof_and_equal_roots() -> None:
    hs = hashes_of(7)
    r = merkle.root_from_hashes(hs)
    assert merkle.consistency_proof_from_hashes(hs, 7) == []
    assert merkle.verify_consistency(7, 7, [], r, r)
    assert not merkle.verify_consistency(7, 7, [r], r, r)
    assert not merkle.verify_consistency(7, 7, [], r, merkle.root_from_hashes(hs[:6]))


def test_from_the_empty_tree_nothing_is_proved() -> None:
    r = merkle.root_from_hashes(hashes_of(3))
    assert not merkle.verify_consistency(0, 3, [], merkle.EMPTY_ROOT, r)
    assert not merkle.verify_consistency(0, 0, [], merkle.EMPTY_ROOT, merkle.EMPTY_ROOT)


def test_roots_and_proof_elements_must_be_hash_sized() -> None:
    hs = hashes_of(6)
    proof = merkle.consistency_proof_from_hashes(hs, 3)
    old, new = merkle.root_from_hashes(hs[:3]), merkle.root_from_hashes(hs)
    assert merkle.verify_consistency(3, 6, proof, old, new)
    assert not merkle.verify_consistency(3, 6, [proof[0][:31], *proof[1:]], old, new)
    assert not merkle.verify_consistency(3, 6, proof, old[:31], new)
    assert not merkle.verify_consistency(3, 6, proof, old, new + b"\x00")
    # Equal sizes and equal roots still need roots that are hashes.
    assert not merkle.verify_consistency(1, 1, [], b"junk", b"junk")


def test_provider_answers_of_the_wrong_length_are_refused() -> None:
    with pytest.raises(ValueError, match="31 bytes"):
        merkle.root_from_provider(3, lambda level, index: b"\x00" * 31)


# --------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------

sizes = st.integers(1, 300).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n)))


@settings(max_examples=400, deadline=None)
@given(sizes)
def test_every_consistency_proof_is_the_rfc_one_and_verifies(mn: tuple[int, int]) -> None:
    m, n = mn
    hs = hashes_of(n)
    proof = merkle.consistency_proof_from_hashes(hs, m)
    assert proof == ref_proof(m, hs)
    old, new = merkle.root_from_hashes(hs[:m]), merkle.root_from_hashes(hs)
    assert merkle.verify_consistency(m, n, proof, old, new)
    assert merkle.root_from_consistency_proof(m, n, proof, old) == new


@st.composite
def tampered(draw: st.DrawFn) -> tuple[int, int, list[bytes], bytes, bytes, str]:
    n = draw(st.integers(2, 300))
    m = draw(st.integers(1, n - 1))
    hs = hashes_of(n)
    proof = merkle.consistency_proof_from_hashes(hs, m)
    old, new = merkle.root_from_hashes(hs[:m]), merkle.root_from_hashes(hs)
    kind = draw(st.sampled_from(["bit", "drop", "extra", "swap", "old", "new", "m"]))
    if kind == "bit":
        j = draw(st.integers(0, len(proof) - 1))
        bit = draw(st.integers(0, 255))
        proof[j] = _flip_bit(proof[j], bit)
    elif kind == "drop":
        del proof[draw(st.integers(0, len(proof) - 1))]
    elif kind == "extra":
        proof.insert(draw(st.integers(0, len(proof))), draw(st.binary(min_size=32, max_size=32)))
    elif kind == "swap":
        if len(proof) < 2 or proof[0] == proof[-1]:
            proof = [*proof, proof[0]]
        else:
            proof[0], proof[-1] = proof[-1], proof[0]
    elif kind == "old":
        old = _flip_bit(old, draw(st.integers(0, 255)))
    elif kind == "new":
        new = _flip_bit(new, draw(st.integers(0, 255)))
    else:
        m = draw(st.integers(0, n + 1).filter(lambda x: x != m))
    return m, n, proof, old, new, kind


@settings(max_examples=1500, deadline=None)
@given(tampered())
def test_any_single_change_is_refused(
    case: tuple[int, int, list[bytes], bytes, bytes, str],
) -> None:
    m, n, proof, old, new, _kind = case
    assert not merkle.verify_consistency(m, n, proof, old, new)


def test_the_new_size_is_bound_by_the_new_root_not_by_the_proof() -> None:
    # As with inclusion proofs, a proof from 2 to 3 leaves also passes as one from 2 to 4
    # with the size-3 root: no tree of 4 leaves has that root, so a verifier that takes size
    # and root from one signed checkpoint is not misled; a changed root always fails.
    hs = hashes_of(4)
    proof = merkle.consistency_proof_from_hashes(hs[:3], 2)
    old, r3, r4 = (merkle.root_from_hashes(hs[:k]) for k in (2, 3, 4))
    assert merkle.verify_consistency(2, 3, proof, old, r3)
    assert merkle.verify_consistency(2, 4, proof, old, r3)
    assert not merkle.verify_consistency(2, 4, proof, old, r4)


def _flip_bit(b: bytes, bit: int) -> bytes:
    i, mask = divmod(bit, 8)
    return b[:i] + bytes([b[i] ^ (1 << mask)]) + b[i + 1 :]


class CountingProvider:
    """A provider over leaf hashes that counts its reads."""

    def __init__(self, hashes: Sequence[bytes]) -> None:
        self._inner = merkle.subtree_hashes(hashes)
        self.reads = 0

    def __call__(self, level: int, index: int) -> bytes:
        self.reads += 1
        return self._inner(level, index)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))))
def test_inclusion_from_the_provider_is_the_rfc_path_in_logarithmic_reads(
    iN: tuple[int, int],
) -> None:
    i, n = iN
    hs = hashes_of(n)
    provider = CountingProvider(hs)
    proof = merkle.inclusion_proof_from_provider(i, n, provider)
    assert proof == merkle.inclusion_proof_from_hashes(hs, i)
    depth = (n - 1).bit_length()
    # One read per level, plus at most one per bit of the one partial subtree on the right.
    assert provider.reads <= 2 * depth + 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(1, n), st.just(n))))
def test_consistency_from_the_provider_takes_logarithmic_reads(mn: tuple[int, int]) -> None:
    m, n = mn
    hs = hashes_of(n)
    provider = CountingProvider(hs)
    proof = merkle.consistency_proof_from_provider(m, n, provider)
    assert merkle.verify_consistency(
        m, n, proof, merkle.root_from_hashes(hs[:m]), merkle.root_from_hashes(hs)
    )
    depth = (n - 1).bit_length()
    assert provider.reads <= 2 * depth + 2


def test_a_million_leaf_proof_reads_few_hashes() -> None:
    n = 1_000_003
    calls: list[tuple[int, int]] = []

    def provider(level: int, index: int) -> bytes:
        # Any stable function of the position stands in for a stored tree here.
        calls.append((level, index))
        return hashlib.sha256(b"%d/%d" % (level, index)).digest()

    merkle.consistency_proof_from_provider(999_999, n, provider)
    assert len(calls) <= 2 * 20 + 2
    calls.clear()
    merkle.inclusion_proof_from_provider(123_456, n, provider)
    assert len(calls) <= 2 * 20 + 1
