"""RFC 9162 (Certificate Transparency v2) section 2.1 Merkle trees.

Leaf hash SHA-256(0x00 || leaf), node hash SHA-256(0x01 || left || right),
split at the largest power of two smaller than n, no duplicated last node
(the CVE-2012-2459 ambiguity cannot arise). Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

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


# --------------------------------------------------------------------------
# Proofs from a subtree-hash provider (RFC 9162 2.1.3 and 2.1.4).
#
# An append-only log keeps its interior as perfect subtrees: the hash of leaves
# [index * 2**level, (index + 1) * 2**level) never changes once they exist. The
# functions below ask a provider for those hashes only, O(log n) of them per
# proof, so the same code runs over a list in memory or over stored tiles.
# --------------------------------------------------------------------------

# (level, index) -> MTH of the perfect subtree over leaves [index << level, (index + 1) << level).
SubtreeHash = Callable[[int, int], bytes]


def subtree_hashes(hashes: Sequence[bytes]) -> SubtreeHash:
    """A provider over leaf hashes in memory; every perfect subtree hashed once, O(n)."""
    levels: list[list[bytes]] = [list(hashes)]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])

    def provide(level: int, index: int) -> bytes:
        if not 0 <= level < len(levels) or not 0 <= index < len(levels[level]):
            raise IndexError(f"no perfect subtree at level {level}, index {index}")
        return levels[level][index]

    return provide


def _fetch(provider: SubtreeHash, level: int, index: int) -> bytes:
    h = provider(level, index)
    if len(h) != HASH_SIZE:
        raise ValueError(f"subtree hash at level {level}, index {index} is {len(h)} bytes")
    return h


def _range_hash(start: int, end: int, provider: SubtreeHash) -> bytes:
    """MTH(D[start:end]) for a node of the tree: at most one provider call per bit of its size.

    A node of the RFC 9162 tree starts at a multiple of the largest power of two not
    above its size, so its leaves split into aligned perfect subtrees of decreasing size;
    hashing them together from the right is the recursive definition.
    """
    parts: list[bytes] = []
    pos, remaining = start, end - start
    while remaining:
        k = 1 << (remaining.bit_length() - 1)
        level = k.bit_length() - 1
        if pos % k:
            raise ValueError(f"[{start}, {end}) is not a node of the tree")
        parts.append(_fetch(provider, level, pos >> level))
        pos += k
        remaining -= k
    h = parts[-1]
    for p in reversed(parts[:-1]):
        h = node_hash(p, h)
    return h


def root_from_provider(size: int, provider: SubtreeHash) -> bytes:
    """MTH(D[size]) from perfect subtree hashes; SHA-256(b"") for the empty tree."""
    if size < 0:
        raise ValueError(f"tree size {size} is negative")
    return EMPTY_ROOT if size == 0 else _range_hash(0, size, provider)


def inclusion_proof_from_provider(index: int, size: int, provider: SubtreeHash) -> list[bytes]:
    """PATH(index, D[size]) of RFC 9162 2.1.3.1, siblings ordered from the leaf up."""
    if not 0 <= index < size:
        raise IndexError(f"leaf index {index} outside a tree of {size}")
    top_down: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            top_down.append(_range_hash(start + k, end, provider))
            end = start + k
        else:
            top_down.append(_range_hash(start, start + k, provider))
            start += k
    return top_down[::-1]


def consistency_proof_from_provider(
    old_size: int, new_size: int, provider: SubtreeHash
) -> list[bytes]:
    """PROOF(old_size, D[new_size]) of RFC 9162 2.1.4.1; empty when the sizes are equal.

    SUBPROOF(m, D[n], b) unrolled: descending left keeps the flag, the first step right
    clears it, and the node reached when m equals the subtree's size is included only
    once the flag is clear (the verifier knows the old root otherwise).
    """
    if not 0 < old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to size {new_size}")
    top_down: list[bytes] = []
    start, end, m, whole = 0, new_size, old_size, True
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            top_down.append(_range_hash(start + k, end, provider))
            end = start + k
        else:
            top_down.append(_range_hash(start, start + k, provider))
            start += k
            m -= k
            whole = False
    if not whole:
        top_down.append(_range_hash(start, end, provider))
    return top_down[::-1]


def consistency_proof_from_hashes(hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(old_size, D[n]) over leaf hashes already computed."""
    return consistency_proof_from_provider(old_size, len(hashes), subtree_hashes(hashes))


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """RFC 9162 2.1.4.1 consistency proof from the first old_size leaves to all of them."""
    return consistency_proof_from_hashes([leaf_hash(d) for d in leaves], old_size)


def roots_from_consistency_proof(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes
) -> tuple[bytes, bytes] | None:
    """RFC 9162 2.1.4.2 without its last comparison: the (old root, new root) the proof
    implies, or None if it is malformed. With 0 < old_size < new_size.

    The old root is reported rather than compared, so a witness can tell a proof that
    opens the new root from a different old tree (a split view) from one that opens
    nothing.
    """
    if not 0 < old_size < new_size or not proof or len(old_root) != HASH_SIZE:
        return None
    if any(len(p) != HASH_SIZE for p in proof):
        return None
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
            return None
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        return None
    return fr, sr


def root_from_consistency_proof(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes
) -> bytes | None:
    """RFC 9162 2.1.4.2: the new root the proof implies, or None if it does not hold.

    None also for old_size 0: the empty tree is a prefix of every tree, so a proof
    from it proves nothing and a caller must treat that case explicitly. Equal sizes
    take an empty proof and imply the old root itself.
    """
    if not 0 < old_size <= new_size or len(old_root) != HASH_SIZE:
        return None
    if any(len(p) != HASH_SIZE for p in proof):
        return None
    if old_size == new_size:
        return old_root if not proof else None
    roots = roots_from_consistency_proof(old_size, new_size, proof, old_root)
    if roots is None or roots[0] != old_root:
        return None
    return roots[1]


def verify_consistency(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> bool:
    """True when the tree of old_size with old_root is a prefix of new_size with new_root."""
    computed = root_from_consistency_proof(old_size, new_size, proof, old_root)
    return computed is not None and len(new_root) == HASH_SIZE and computed == new_root
