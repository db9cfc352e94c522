"""An append-only RFC 9162 tree kept as tiles (c2sp.org/tlog-tiles): growing it, and
reading roots and proofs back from stored tiles. Pure: tiles come from a fetch callable.

A tile at tile level L holds up to 256 hashes of tree level 8L. A hash never changes once
its leaves exist, so a tile only grows (a partial tile is rewritten wider) and a proof for
any earlier tree size reads a prefix of it.

`LogEdge` is the rightmost tile of each level: all a new root needs, so a log's writer
holds it in memory between appends. `TileReader` serves merkle.SubtreeHash from stored
tiles, one read per tile and a few tiles per tile level, so inclusion and consistency
proofs cost O(log n) reads whatever the size of the log.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.formats import merkle, tiles

HASH = merkle.HASH_SIZE
FULL_TILE_BYTES = tiles.TILE_WIDTH * HASH

# (tile level, tile index) -> stored bytes of that tile (possibly wider than needed), or None.
TileFetch = Callable[[int, int], bytes | None]


class LogStateError(RuntimeError):
    """The stored tiles do not hold what a tree of the asked size needs."""


@dataclass(frozen=True, slots=True)
class TileWrite:
    level: int
    index: int
    data: bytes


def _rightmost_index(size: int, level: int) -> int:
    """Index of the rightmost tile at tile `level` of a tree of `size` (it has hashes)."""
    return ((size >> (tiles.TILE_HEIGHT * level)) - 1) // tiles.TILE_WIDTH


@dataclass(frozen=True, slots=True)
class LogEdge:
    """A tree of `size` leaves by the rightmost tile of each tile level that has hashes
    (`edge[L]`: that tile's bytes, full or partial)."""

    size: int
    edge: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        levels = 0
        while self.size >> (tiles.TILE_HEIGHT * levels):
            levels += 1
        if len(self.edge) != levels:
            raise LogStateError(
                f"a tree of {self.size} has {levels} tile levels, not {len(self.edge)}"
            )
        for level, data in enumerate(self.edge):
            index = _rightmost_index(self.size, level)
            width = tiles.tile_width(level, index, self.size)
            if len(data) != width * HASH:
                raise LogStateError(
                    f"tile {level}/{index} of a tree of {self.size}: {len(data)} bytes, "
                    f"expected {width * HASH}"
                )

    def provide(self, level: int, index: int) -> bytes:
        """merkle.SubtreeHash over the edge: enough for the root of this size."""
        where = tiles.locate(level, index, self.size)
        tl = where.tile.level
        if tl >= len(self.edge) or where.tile.index != _rightmost_index(self.size, tl):
            raise LogStateError(f"subtree ({level}, {index}) is not on the tree's right edge")
        return tiles.hash_from_tile(self.edge[tl], where)

    def root(self) -> bytes:
        return merkle.root_from_provider(self.size, self.provide)

    def append(self, leaf_hashes: Sequence[bytes]) -> tuple[LogEdge, list[TileWrite]]:
        """The tree with `leaf_hashes` appended, and the tiles to store for it (every
        tile that changed or is new, at its new width)."""
        edge = list(self.edge)
        writes: list[TileWrite] = []
        carry = [bytes(h) for h in leaf_hashes]
        for h in carry:
            if len(h) != HASH:
                raise ValueError(f"a leaf hash is {len(h)} bytes, expected {HASH}")
        level = 0
        while carry:
            have = self.size >> (tiles.TILE_HEIGHT * level)
            if level < len(edge) and len(edge[level]) < FULL_TILE_BYTES:
                tile, index = edge[level], _rightmost_index(self.size, level)
            else:
                tile, index = b"", have // tiles.TILE_WIDTH
            up: list[bytes] = []
            buf = bytearray(tile)
            for h in carry:
                buf += h
                if len(buf) == FULL_TILE_BYTES:
                    full = bytes(buf)
                    writes.append(TileWrite(level, index, full))
                    up.append(
                        merkle.root_from_hashes(
                            [full[i : i + HASH] for i in range(0, FULL_TILE_BYTES, HASH)]
                        )
                    )
                    last = full
                    index += 1
                    buf = bytearray()
            if buf:
                writes.append(TileWrite(level, index, bytes(buf)))
                last = bytes(buf)
            if level < len(edge):
                edge[level] = last
            else:
                edge.append(last)
            carry = up
            level += 1
        return LogEdge(self.size + len(leaf_hashes), tuple(edge)), writes


def load_edge(size: int, fetch: TileFetch) -> LogEdge:
    """The edge of a stored tree of `size` leaves (one read per tile level)."""
    edge: list[bytes] = []
    level = 0
    while size >> (tiles.TILE_HEIGHT * level):
        index = _rightmost_index(size, level)
        width = tiles.tile_width(level, index, size)
        data = fetch(level, index)
        if data is None or len(data) < width * HASH:
            raise LogStateError(f"tile {level}/{index} of a tree of {size} is missing or short")
        edge.append(data[: width * HASH])
        level += 1
    return LogEdge(size, tuple(edge))


class _SharedLevels:
    """`tiles.tile_levels` of recently read tiles, keyed by the tiles' bytes, shared by
    every reader in the process. Content-addressed, so it cannot answer for a different
    log or a wider tile; bounded by count. Readers put only tiles above level 0 and
    partial tiles here: every proof of a log walks those, while a level-0 tile is the
    one a random lookup reads once."""

    def __init__(self, max_tiles: int) -> None:
        self._max = max_tiles
        self._levels: OrderedDict[bytes, list[list[bytes]]] = OrderedDict()
        self._lock = threading.Lock()

    def levels(self, data: bytes) -> list[list[bytes]]:
        with self._lock:
            known = self._levels.get(data)
            if known is not None:
                self._levels.move_to_end(data)
                return known
        levels = tiles.tile_levels(data)
        with self._lock:
            self._levels[data] = levels
            while len(self._levels) > self._max:
                self._levels.popitem(last=False)
        return levels


# 32 tiles: every tile level 1 and 2 tile of a 2,000,000-leaf log, about 1.2 MB.
SHARED_LEVELS = _SharedLevels(32)


class TileReader:
    """merkle.SubtreeHash for a tree of `size` leaves over stored tiles: each tile read
    once and hashed once into its `tiles.tile_levels` (kept for the reader's life, which
    is one proof or the proofs of one chunk of receipts: neighbouring leaves share most
    of their path; tiles above level 0 and partial ones are shared between readers by
    SHARED_LEVELS). `reads` counts the tile reads."""

    def __init__(self, size: int, fetch: TileFetch) -> None:
        self.size = size
        self._fetch = fetch
        self._levels: dict[tuple[int, int], list[list[bytes]]] = {}
        self.reads = 0

    def __call__(self, level: int, index: int) -> bytes:
        where = tiles.locate(level, index, self.size)
        key = (where.tile.level, where.tile.index)
        levels = self._levels.get(key)
        if levels is None:
            self.reads += 1
            stored = self._fetch(*key)
            need = where.tile.width * HASH
            if stored is None or len(stored) < need:
                raise LogStateError(
                    f"tile {where.tile.path()} of a tree of {self.size} is missing or short"
                )
            data = stored[:need]
            if where.tile.level or where.tile.partial:
                levels = SHARED_LEVELS.levels(data)
            else:
                levels = tiles.tile_levels(data)
            self._levels[key] = levels
        return tiles.levels_slice(levels, where)

    def root(self) -> bytes:
        return merkle.root_from_provider(self.size, self)

    def inclusion_proof(self, index: int) -> list[bytes]:
        return merkle.inclusion_proof_from_provider(index, self.size, self)

    def consistency_proof(self, old_size: int) -> list[bytes]:
        return merkle.consistency_proof_from_provider(old_size, self.size, self)
