"""RFC 9162 section 2.1 Merkle trees: gateway.formats.merkle against pinned vectors and
against a recursive reference written straight from the RFC's definitions.

tests/vectors/merkle.json is produced by the reference below
(`python tests/test_merkle.py > tests/vectors/merkle.json`), never by
gateway.formats.merkle, so the two implementations check each other.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.formats import merkle

VECTORS = Path(__file__).parent / "vectors" / "merkle.json"

# --------------------------------------------------------------------------
# Reference: RFC 9162 section 2.1, transcribed recursively.
# --------------------------------------------------------------------------


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _largest_power_of_two_below(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_leaf_hash(leaf: bytes) -> bytes:
    return _sha256(b"\x00" + leaf)


def ref_mth(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of RFC 9162 2.1.1."""
    n = len(leaves)
    if n == 0:
        return _sha256(b"")
    if n == 1:
        return ref_leaf_hash(leaves[0])
    k = _largest_power_of_two_below(n)
    return _sha256(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:]))


def ref_path(m: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 2.1.3.1, siblings from the leaf up."""
    n = len(leaves)
    if n == 1:
        return []
    k = _largest_power_of_two_below(n)
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_mth(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_mth(leaves[:k])]


def _ref_root_from_path(m: int, n: int, leaf_hash: bytes, path: Sequence[bytes]) -> bytes | None:
    """Undo ref_path: the root `path` implies for leaf m of n, or None if the shape is wrong."""
    if n == 1:
        return leaf_hash if not path else None
    if not path:
        return None
    k = _largest_power_of_two_below(n)
    *rest, last = path
    if m < k:
        sub = _ref_root_from_path(m, k, leaf_hash, rest)
        return None if sub is None else _sha256(b"\x01" + sub + last)
    sub = _ref_root_from_path(m - k, n - k, leaf_hash, rest)
    return None if sub is None else _sha256(b"\x01" + last + sub)


def ref_verify(leaf: bytes, m: int, n: int, path: Sequence[bytes], root: bytes) -> bool:
    if not 0 <= m < n or any(len(p) != 32 for p in path):
        return False
    return _ref_root_from_path(m, n, ref_leaf_hash(leaf), path) == root


def rule_leaves(n: int) -> list[bytes]:
    """The documented leaf rule of merkle.json: leaf i is the ASCII of "leaf-%d" % i."""
    return [b"leaf-%d" % i for i in range(n)]


# --------------------------------------------------------------------------
# Vector generation (reference only) and loading.
# --------------------------------------------------------------------------

RULE_SIZES = [*range(10), 16, 17, 31, 100]
PROOF_CASES = [
    (1, 0),
    (2, 0),
    (2, 1),
    (3, 2),
    (5, 4),
    (6, 3),
    (7, 3),
    (7, 6),
    (8, 0),
    (8, 7),
    (9, 8),
    (16, 5),
    (17, 16),
    (31, 30),
    (100, 0),
    (100, 63),
    (100, 64),
    (100, 99),
]
TAMPER_SOURCES = [(3, 2), (7, 3), (9, 8), (17, 16), (100, 63)]

CT_LEAVES_HEX = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
# The Certificate Transparency reference tree heads for the first n of those leaves, n = 0..8,
# and two of its published inclusion proofs.
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]


def _flip(b: bytes, i: int) -> bytes:
    return b[:i] + bytes([b[i] ^ 0x01]) + b[i + 1 :]


def _tampered(size: int, index: int) -> list[dict[str, Any]]:
    leaves = rule_leaves(size)
    leaf = leaves[index]
    path = ref_path(index, leaves)
    root = ref_mth(leaves)
    cases: list[tuple[str, bytes, int, int, list[bytes], bytes]] = [
        (
            "flipped byte in first proof element",
            leaf,
            index,
            size,
            [_flip(path[0], 0), *path[1:]],
            root,
        ),
        (
            "flipped byte in last proof element",
            leaf,
            index,
            size,
            [*path[:-1], _flip(path[-1], 31)],
            root,
        ),
        ("wrong index (index - 1)", leaf, index - 1, size, path, root),
        ("wrong index (index + 1)", leaf, index + 1, size, path, root),
        ("wrong size (size + 1)", leaf, index, size + 1, path, root),
        ("wrong size (size - 1)", leaf, index, size - 1, path, root),
        ("truncated proof", leaf, index, size, path[:-1], root),
        ("extra proof element", leaf, index, size, [*path, root], root),
        ("proof element reordered", leaf, index, size, path[::-1], root),
        ("wrong leaf", leaves[index - 1], index, size, path, root),
        ("flipped byte in root", leaf, index, size, path, _flip(root, 7)),
        ("short proof element", leaf, index, size, [path[0][:31], *path[1:]], root),
    ]
    out = []
    for name, lf, m, n, p, r in cases:
        # A changed size is not always detectable (the proof of leaf 0 in a tree of 8 also
        # proves it in a tree of 5..8 with the same root); only keep cases that must fail.
        if ref_verify(lf, m, n, p, r):
            continue
        out.append(
            {
                "name": f"{name}, from index {index} of {size}",
                "leaf": lf.hex(),
                "index": m,
                "size": n,
                "proof": [x.hex() for x in p],
                "root": r.hex(),
            }
        )
    return out


def build_vectors() -> dict[str, Any]:
    ct_leaves = [bytes.fromhex(h) for h in CT_LEAVES_HEX]
    return {
        "description": (
            "RFC 9162 section 2.1 Merkle tree hashes and inclusion proofs. Leaf hash "
            "SHA-256(0x00 || leaf), node hash SHA-256(0x01 || left || right), split at the "
            "largest power of two below n. All hex. Produced by the recursive reference in "
            "tests/test_merkle.py (run it as a script to regenerate)."
        ),
        "leaf_rule": 'in "roots" and "inclusion", leaf i (from 0) is the ASCII of "leaf-%d" % i',
        "roots": [{"size": n, "root": ref_mth(rule_leaves(n)).hex()} for n in RULE_SIZES],
        "inclusion": [
            {
                "index": m,
                "size": n,
                "leaf": rule_leaves(n)[m].hex(),
                "proof": [p.hex() for p in ref_path(m, rule_leaves(n))],
                "root": ref_mth(rule_leaves(n)).hex(),
            }
            for n, m in PROOF_CASES
        ],
        "inclusion_must_fail": [c for n, m in TAMPER_SOURCES for c in _tampered(n, m)],
        "certificate_transparency": {
            "description": (
                "The Certificate Transparency reference leaves (hex); roots[n] is the tree "
                "head over the first n of them"
            ),
            "leaves": CT_LEAVES_HEX,
            "roots": [ref_mth(ct_leaves[:n]).hex() for n in range(len(ct_leaves) + 1)],
            "inclusion": [
                {"index": m, "size": n, "proof": proof, "root": CT_ROOTS[n]}
                for m, n, proof in CT_INCLUSION
            ],
        },
    }


def _load() -> dict[str, Any]:
    if not VECTORS.is_file():  # regenerating: the tests cannot run without the file
        return {
            "roots": [],
            "inclusion": [],
            "inclusion_must_fail": [],
            "certificate_transparency": {"inclusion": []},
        }
    data: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))
    return data


V = _load()


def _hexes(xs: Sequence[str]) -> list[bytes]:
    return [bytes.fromhex(x) for x in xs]


def _id(case: dict[str, Any]) -> str:
    return str(case.get("name") or f"{case['index']}of{case['size']}")


# --------------------------------------------------------------------------
# The reference and the vector file.
# --------------------------------------------------------------------------


def test_reference_reproduces_certificate_transparency_roots() -> None:
    leaves = _hexes(CT_LEAVES_HEX)
    assert [ref_mth(leaves[:n]).hex() for n in range(9)] == CT_ROOTS


def test_reference_reproduces_certificate_transparency_proofs() -> None:
    leaves = _hexes(CT_LEAVES_HEX)
    for m, n, proof in CT_INCLUSION:
        assert [p.hex() for p in ref_path(m, leaves[:n])] == proof
        assert ref_verify(leaves[m], m, n, _hexes(proof), bytes.fromhex(CT_ROOTS[n]))


def test_vector_file_is_what_the_reference_produces() -> None:
    assert build_vectors() == V


def test_vector_file_covers_the_required_sizes() -> None:
    assert {c["size"] for c in V["roots"]} >= {*range(10), 16, 17, 31, 100}
    names = " ".join(c["name"] for c in V["inclusion_must_fail"])
    for kind in ("flipped byte", "wrong index", "wrong size", "truncated", "extra"):
        assert kind in names


# --------------------------------------------------------------------------
# gateway.formats.merkle against the vectors.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case", V["roots"], ids=lambda c: f"size{c['size']}")
def test_root_matches_vector(case: dict[str, Any]) -> None:
    leaves = rule_leaves(case["size"])
    assert merkle.root(leaves).hex() == case["root"]
    hashes = [merkle.leaf_hash(d) for d in leaves]
    assert merkle.root_from_hashes(hashes).hex() == case["root"]


@pytest.mark.parametrize("case", V["inclusion"], ids=_id)
def test_inclusion_proof_matches_vector(case: dict[str, Any]) -> None:
    leaves = rule_leaves(case["size"])
    assert bytes.fromhex(case["leaf"]) == leaves[case["index"]]
    proof = merkle.inclusion_proof(leaves, case["index"])
    assert [p.hex() for p in proof] == case["proof"]
    assert merkle.verify_inclusion(
        bytes.fromhex(case["leaf"]),
        case["index"],
        case["size"],
        _hexes(case["proof"]),
        bytes.fromhex(case["root"]),
    )


@pytest.mark.parametrize("case", V["inclusion_must_fail"], ids=_id)
def test_tampered_inclusion_proof_is_refused(case: dict[str, Any]) -> None:
    assert not merkle.verify_inclusion(
        bytes.fromhex(case["leaf"]),
        case["index"],
        case["size"],
        _hexes(case["proof"]),
        bytes.fromhex(case["root"]),
    )


def test_certificate_transparency_roots() -> None:
    ct = V["certificate_transparency"]
    leaves = _hexes(ct["leaves"])
    assert ct["roots"] == CT_ROOTS
    for n, want in enumerate(ct["roots"]):
        assert merkle.root(leaves[:n]).hex() == want


@pytest.mark.parametrize("case", V["certificate_transparency"]["inclusion"], ids=_id)
def test_certificate_transparency_inclusion(case: dict[str, Any]) -> None:
    leaves = _hexes(V["certificate_transparency"]["leaves"])[: case["size"]]
    proof = merkle.inclusion_proof(leaves, case["index"])
    assert [p.hex() for p in proof] == case["proof"]
    assert merkle.verify_inclusion(
        leaves[case["index"]], case["index"], case["size"], proof, bytes.fromhex(case["root"])
    )


# --------------------------------------------------------------------------
# Shape rules.
# --------------------------------------------------------------------------


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert merkle.root([]) == hashlib.sha256(b"").digest() == merkle.EMPTY_ROOT
    assert merkle.root_from_hashes([]) == merkle.EMPTY_ROOT


def test_single_leaf_root_is_its_leaf_hash() -> None:
    assert merkle.root([b"x"]) == hashlib.sha256(b"\x00x").digest()
    assert merkle.inclusion_proof([b"x"], 0) == []
    assert merkle.verify_inclusion(b"x", 0, 1, [], merkle.root([b"x"]))


def _bitcoin_style_root(leaves: Sequence[bytes]) -> bytes:
    """Pairs up each level and duplicates an odd last node: the CVE-2012-2459 shape."""
    level = [ref_leaf_hash(d) for d in leaves]
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [_sha256(b"\x01" + level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def test_duplicating_the_last_leaf_changes_the_root() -> None:
    a, b, c = b"a", b"b", b"c"
    # The ambiguity is real in the duplicating construction...
    assert _bitcoin_style_root([a, b, c]) == _bitcoin_style_root([a, b, c, c])
    # ...and absent here: no odd node is ever paired with itself.
    assert merkle.root([a, b, c]) != merkle.root([a, b, c, c])
    assert merkle.root([a]) != merkle.root([a, a])
    assert merkle.root([a, b]) != merkle.root([a, b, b])
    assert merkle.root([a, b, c, b"d", b"e"]) != merkle.root([a, b, c, b"d", b"e", b"e"])


def test_interior_node_cannot_pass_as_a_leaf() -> None:
    a, b = b"a", b"b"
    inner = merkle.leaf_hash(a) + merkle.leaf_hash(b)
    assert merkle.root([inner]) != merkle.root([a, b])
    assert merkle.root([b"\x01" + inner]) != merkle.root([a, b])


def test_split_is_the_largest_power_of_two_below_n() -> None:
    leaves = rule_leaves(7)
    left, right = merkle.root(leaves[:4]), merkle.root(leaves[4:])
    assert merkle.root(leaves) == merkle.node_hash(left, right)
    # A midpoint split (3 | 4) gives another, non-interoperable root.
    assert merkle.root(leaves) != merkle.node_hash(merkle.root(leaves[:3]), merkle.root(leaves[3:]))


@pytest.mark.parametrize(("size", "index"), [(0, 0), (1, 1), (3, 3), (3, -1), (8, 100)])
def test_inclusion_proof_out_of_range_raises_index_error(size: int, index: int) -> None:
    with pytest.raises(IndexError):
        merkle.inclusion_proof(rule_leaves(size), index)


@pytest.mark.parametrize(("size", "index"), [(0, 0), (3, 3), (3, -1)])
def test_verify_inclusion_refuses_index_outside_tree(size: int, index: int) -> None:
    assert not merkle.verify_inclusion(b"leaf-0", index, size, [], merkle.root(rule_leaves(1)))


def test_verify_inclusion_refuses_a_short_leaf_hash() -> None:
    assert merkle.root_from_inclusion_proof(b"\x00" * 31, 0, 1, []) is None


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_proof_elements_must_be_hash_sized(length: int) -> None:
    leaf_hash = merkle.leaf_hash(b"leaf-0")
    assert merkle.root_from_inclusion_proof(leaf_hash, 0, 2, [b"\x07" * length]) is None


# --------------------------------------------------------------------------
# Properties against the reference.
# --------------------------------------------------------------------------

leaf_lists = st.lists(st.binary(max_size=24), max_size=70)
nonempty_leaf_lists = st.lists(st.binary(max_size=24), min_size=1, max_size=70)


@settings(max_examples=500, deadline=None)
@given(leaf_lists)
def test_root_equals_the_recursive_definition(leaves: list[bytes]) -> None:
    assert merkle.root(leaves) == ref_mth(leaves)


@settings(max_examples=150, deadline=None)
@given(nonempty_leaf_lists)
def test_every_inclusion_proof_is_the_rfc_path_and_verifies(leaves: list[bytes]) -> None:
    root = merkle.root(leaves)
    hashes = [merkle.leaf_hash(d) for d in leaves]
    for m, leaf in enumerate(leaves):
        proof = merkle.inclusion_proof(leaves, m)
        assert proof == ref_path(m, leaves)
        assert merkle.inclusion_proof_from_hashes(hashes, m) == proof
        assert merkle.verify_inclusion(leaf, m, len(leaves), proof, root)


@st.composite
def proof_and_mutation(draw: st.DrawFn) -> tuple[list[bytes], int, str, Any]:
    # Distinct leaves: with repeats, "leaf 1" may truly sit at index 0 as well.
    leaves = draw(st.lists(st.binary(max_size=24), min_size=1, max_size=70, unique=True))
    m = draw(st.integers(0, len(leaves) - 1))
    kind = draw(
        st.sampled_from(
            ["proof_bit", "truncate", "extend", "index", "size", "leaf", "root", "drop_inner"]
        )
    )
    return leaves, m, kind, draw(st.data())


@settings(max_examples=1000, deadline=None)
@given(proof_and_mutation())
def test_any_single_mutation_is_refused(case: tuple[list[bytes], int, str, Any]) -> None:
    leaves, m, kind, data = case
    n = len(leaves)
    leaf, proof, root = leaves[m], merkle.inclusion_proof(leaves, m), merkle.root(leaves)
    if kind == "proof_bit":
        if not proof:
            return
        j = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        proof[j] = _flip_bit(proof[j], bit)
    elif kind == "truncate":
        if not proof:
            return
        proof = proof[: data.draw(st.integers(0, len(proof) - 1))]
    elif kind == "extend":
        proof = [*proof, data.draw(st.binary(min_size=32, max_size=32))]
    elif kind == "drop_inner":
        if len(proof) < 2:
            return
        del proof[data.draw(st.integers(0, len(proof) - 2))]
    elif kind == "index":
        other = data.draw(st.integers(-2, n + 2).filter(lambda i: i != m))
        assert not merkle.verify_inclusion(leaf, other, n, proof, root)
        return
    elif kind == "size":
        # The verifier agrees with the recursive definition on every size; a size that
        # leaves the leaf's path unchanged is not a forgery (the root binds the size).
        other = data.draw(st.integers(-1, 2 * n + 2).filter(lambda s: s != n))
        got = merkle.verify_inclusion(leaf, m, other, proof, root)
        assert got == ref_verify(leaf, m, other, proof, root)
        return
    elif kind == "leaf":
        leaf = data.draw(st.binary(max_size=24).filter(lambda d: d != leaves[m]))
    elif kind == "root":
        root = _flip_bit(root, data.draw(st.integers(0, 255)))
    assert not merkle.verify_inclusion(leaf, m, n, proof, root)
    assert not ref_verify(leaf, m, n, proof, root)


def _flip_bit(b: bytes, bit: int) -> bytes:
    i, mask = divmod(bit, 8)
    return b[:i] + bytes([b[i] ^ (1 << mask)]) + b[i + 1 :]


if __name__ == "__main__":
    json.dump(build_vectors(), sys.stdout, indent=2)
    sys.stdout.write("\n")
