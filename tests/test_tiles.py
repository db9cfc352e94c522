"""The tlog-tiles layout: the examples of c2sp.org/tlog-tiles, and a tree stored as tiles
serving the same roots and proofs as the tree in memory, with few tile reads per proof.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.formats import merkle, tiles
from gateway.formats.tiles import Tile


def test_index_encoding_example_of_the_spec() -> None:
    assert tiles.encode_index(1234067) == "x001/x234/067"
    assert tiles.encode_index(0) == "000"
    assert tiles.encode_index(999) == "999"
    assert tiles.encode_index(1000) == "x001/000"


def test_tree_of_70000_is_the_spec_example() -> None:
    ts = tiles.tiles_for_size(70_000)
    level0 = [t for t in ts if t.level == 0]
    assert sum(not t.partial for t in level0) == 273
    assert [t.width for t in level0 if t.partial] == [112]
    assert [t.width for t in ts if t.level == 1] == [256, 17]
    assert [t.width for t in ts if t.level == 2] == [1]
    assert max(t.level for t in ts) == 2


def test_tree_of_256_is_the_spec_example() -> None:
    assert tiles.tiles_for_size(256) == [Tile(0, 0, 256), Tile(1, 0, 1)]
    assert tiles.tiles_for_size(0) == []
    assert tiles.tiles_for_size(1) == [Tile(0, 0, 1)]


def test_paths() -> None:
    assert Tile(0, 1234067).path() == "tile/0/x001/x234/067"
    assert Tile(2, 5, 17).path() == "tile/2/005.p/17"
    assert Tile(0, 5, 17).entries_path() == "tile/entries/005.p/17"
    with pytest.raises(ValueError):
        Tile(1, 0).entries_path()
    for t in (Tile(0, 0), Tile(3, 1234067, 255), Tile(63, 10**9, 1), Tile(1, 999, 1)):
        assert tiles.parse_tile_path(t.path()) == t


@pytest.mark.parametrize(
    "path",
    [
        "tile/01/000",
        "tile/64/000",
        "tile/0/00",
        "tile/0/0000",
        "tile/0/001/234",
        "tile/0/x000/001",
        "tile/0/000.p/0",
        "tile/0/000.p/256",
        "tile/0/000.p/017",
        "tile/0/000.p",
        "tiles/0/000",
        "tile/0",
        "tile/0/x001",
        "tile/entries/000",
    ],
)
def test_non_canonical_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        tiles.parse_tile_path(path)


def store_for(n: int) -> tuple[list[bytes], dict[str, bytes]]:
    hs = [merkle.leaf_hash(b"e%d" % i) for i in range(n)]
    provider = merkle.subtree_hashes(hs)
    return hs, {t.path(): tiles.tile_data(t, provider) for t in tiles.tiles_for_size(n)}


class TileReader:
    """merkle.SubtreeHash over stored tiles, recording which tiles it read."""

    def __init__(self, store: dict[str, bytes], size: int) -> None:
        self.store = store
        self.size = size
        self.read: set[str] = set()

    def __call__(self, level: int, index: int) -> bytes:
        where = tiles.locate(level, index, self.size)
        self.read.add(where.tile.path())
        return tiles.hash_from_tile(self.store[where.tile.path()], where)


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.integers(1, 600), st.integers(65_000, 70_000)), st.data())
def test_a_tiled_tree_serves_the_same_root_and_proofs(n: int, data: st.DataObject) -> None:
    hs, store = store_for(n)
    reader = TileReader(store, n)
    assert merkle.root_from_provider(n, reader) == merkle.root_from_hashes(hs)
    i = data.draw(st.integers(0, n - 1))
    reader.read.clear()
    assert merkle.inclusion_proof_from_provider(i, n, reader) == merkle.inclusion_proof_from_hashes(
        hs, i
    )
    # A few tiles per tile level (the leaf's own, its right edge, the partial ones).
    levels = len({p.split("/")[1] for p in store})
    assert len(reader.read) <= 3 * levels
    m = data.draw(st.integers(1, n))
    reader.read.clear()
    proof = merkle.consistency_proof_from_provider(m, n, reader)
    assert proof == merkle.consistency_proof_from_hashes(hs, m)
    assert len(reader.read) <= 4 * levels


def test_full_tiles_never_change_and_partial_tiles_grow_as_prefixes() -> None:
    _, small = store_for(600)
    _, large = store_for(70_000)
    for path, data in small.items():
        t = tiles.parse_tile_path(path)
        full = Tile(t.level, t.index).path()
        if not t.partial:
            assert large[path] == data
        else:
            assert large[full].startswith(data)


def test_locate_refuses_subtrees_the_tree_does_not_have() -> None:
    with pytest.raises(IndexError):
        tiles.locate(0, 10, 10)
    with pytest.raises(IndexError):
        tiles.locate(3, 1, 15)
    where = tiles.locate(9, 0, 1024)  # 512 leaves: two level-1 hashes of tile 1/0
    assert (where.tile, where.start, where.count) == (Tile(1, 0, 4), 0, 2)
    with pytest.raises(ValueError):
        tiles.hash_from_tile(b"\x00" * 31, where)
