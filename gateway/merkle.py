"""RFC 9162 (Certificate Transparency v2) section 2.1 Merkle trees.

Leaf hash SHA-256(0x00 || leaf), node hash SHA-256(0x01 || left || right),
split at the largest power of two smaller than n, no duplicated last node
(the CVE-2012-2459 ambiguity cannot arise). Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_hashes(hashes: Sequence[bytes]) -> bytes:
    """Tree hash over leaf hashes already computed.

    Iterative and equal to the recursive definition: pairing left to right at
    each level and carrying an odd last node up unchanged yields exactly the
    split-at-largest-power-of-two tree.
    """
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def root(leaves: Sequence[bytes]) -> bytes:
    """Merkle tree hash of raw leaf data; SHA-256(b"") for the empty tree."""
    return root_from_hashes([leaf_hash(d) for d in leaves])


def inclusion_proof_from_hashes(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(m, D[n]) over leaf hashes, siblings ordered from the leaf up."""
    n = len(hashes)
    if not 0 <= index < n:
        raise IndexError(f"leaf index {index} outside a tree of {n}")
    proof: list[bytes] = []
    level = list(hashes)
    i = index
    while len(level) > 1:
        sibling = i ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        nxt = [node_hash(level[j], level[j + 1]) for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
        i //= 2
    return proof


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """RFC 9162 2.1.3.1 inclusion proof for leaves[index] (raw leaf data)."""
    return inclusion_proof_from_hashes([leaf_hash(d) for d in leaves], index)


def root_from_inclusion_proof(
    leaf_hash_: bytes, index: int, size: int, proof: Sequence[bytes]
) -> bytes | None:
    """RFC 9162 2.1.3.2 verification: the root the proof implies, or None if malformed."""
    if not 0 <= index < size or len(leaf_hash_) != HASH_SIZE:
        return None
    fn, sn = index, size - 1
    r = leaf_hash_
    for p in proof:
        if len(p) != HASH_SIZE or sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        return None
    return r


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """True when `proof` shows raw leaf data `leaf` at `index` in the tree of `size` with `root`."""
    computed = root_from_inclusion_proof(leaf_hash(leaf), index, size, proof)
    return computed is not None and computed == root
