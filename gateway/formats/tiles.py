"""The tlog-tiles layout (c2sp.org/tlog-tiles): where each hash of the tree is stored.

A tile at tile level L and index N holds up to 256 consecutive hashes of tree level 8L,
the hashes of the perfect subtrees over leaves [(N*256 + i) * 256**L, ... + 256**L);
the rightmost tiles of a level are partial. Pure functions: paths, which tiles exist for
a tree size, and which tile (and which of its hashes) gives a perfect subtree hash, so a
store of tiles serves merkle.SubtreeHash with one tile read per hash.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from gateway.formats import merkle

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_TILE_LEVEL = 63
_ELEMENT = re.compile(r"[0-9]{3}", re.ASCII)
_DECIMAL = re.compile(r"0|[1-9][0-9]*", re.ASCII)


@dataclass(frozen=True, slots=True, order=True)
class Tile:
    """Tile level, index within the level, and width (256 for a full tile)."""

    level: int
    index: int
    width: int = TILE_WIDTH

    def __post_init__(self) -> None:
        if not 0 <= self.level <= MAX_TILE_LEVEL:
            raise ValueError(f"tile level {self.level} outside 0..{MAX_TILE_LEVEL}")
        if self.index < 0:
            raise ValueError(f"tile index {self.index} is negative")
        if not 1 <= self.width <= TILE_WIDTH:
            raise ValueError(f"tile width {self.width} outside 1..{TILE_WIDTH}")

    @property
    def partial(self) -> bool:
        return self.width < TILE_WIDTH

    def path(self) -> str:
        """`tile/<L>/<N>[.p/<W>]`, relative to the log's prefix."""
        return f"tile/{self.level}/{_suffix(self.index, self.width)}"

    def entries_path(self) -> str:
        """`tile/entries/<N>[.p/<W>]`: the entry bundle beside a level-0 tile."""
        if self.level != 0:
            raise ValueError("entry bundles exist only beside level-0 tiles")
        return f"tile/entries/{_suffix(self.index, self.width)}"

    @property
    def tree_level(self) -> int:
        """The tree level of the hashes the tile holds (level 0: leaf hashes)."""
        return TILE_HEIGHT * self.level

    def hash_positions(self) -> list[tuple[int, int]]:
        """(tree level, index) of each hash in the tile, in order."""
        first = self.index * TILE_WIDTH
        return [(self.tree_level, first + i) for i in range(self.width)]

    def leaf_range(self) -> tuple[int, int]:
        """The leaves [start, end) the tile's hashes span."""
        span = 1 << self.tree_level
        start = self.index * TILE_WIDTH * span
        return start, start + self.width * span


def _suffix(index: int, width: int) -> str:
    n = encode_index(index)
    return n if width == TILE_WIDTH else f"{n}.p/{width}"


def encode_index(index: int) -> str:
    """Zero-padded 3-digit path elements, all but the last prefixed with x: 1234067 ->
    x001/x234/067."""
    if index < 0:
        raise ValueError(f"tile index {index} is negative")
    groups = [f"{index % 1000:03d}"]
    index //= 1000
    while index:
        groups.append(f"x{index % 1000:03d}")
        index //= 1000
    return "/".join(reversed(groups))


def parse_tile_path(path: str) -> Tile:
    """The tile a `tile/<L>/<N>[.p/<W>]` path names; ValueError for any other spelling."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile":
        raise ValueError(f"{path!r} is not a tile path")
    level_text, elements = parts[1], parts[2:]
    if not _DECIMAL.fullmatch(level_text) or int(level_text) > MAX_TILE_LEVEL:
        raise ValueError(f"{path!r}: level {level_text!r} is not a decimal in 0..63")
    width = TILE_WIDTH
    if len(elements) >= 2 and elements[-2].endswith(".p"):
        width_text = elements[-1]
        if not _DECIMAL.fullmatch(width_text) or not 1 <= int(width_text) < TILE_WIDTH:
            raise ValueError(f"{path!r}: partial width {width_text!r} is not in 1..255")
        width = int(width_text)
        elements = [*elements[:-2], elements[-2][: -len(".p")]]
    index = 0
    for i, el in enumerate(elements):
        last = i == len(elements) - 1
        digits = el if last else el.removeprefix("x")
        if (not last and not el.startswith("x")) or not _ELEMENT.fullmatch(digits):
            raise ValueError(f"{path!r}: {el!r} is not a tile index element")
        index = index * 1000 + int(digits)
    tile = Tile(int(level_text), index, width)
    if tile.path() != path:
        # Leading "x000/" groups would spell the same index twice.
        raise ValueError(f"{path!r} is not the canonical path of its tile")
    return tile


def tile_width(level: int, index: int, size: int) -> int:
    """Width of tile (level, index) in a tree of `size` leaves; 0 if it does not exist."""
    hashes_at_level = size >> (TILE_HEIGHT * level)
    return max(0, min(TILE_WIDTH, hashes_at_level - index * TILE_WIDTH))


def tiles_for_size(size: int) -> list[Tile]:
    """Every tile, full or partial, that a tree of `size` leaves has (empty tiles excluded)."""
    if size < 0:
        raise ValueError(f"tree size {size} is negative")
    tiles: list[Tile] = []
    level = 0
    while size >> (TILE_HEIGHT * level):
        hashes = size >> (TILE_HEIGHT * level)
        for index in range((hashes + TILE_WIDTH - 1) // TILE_WIDTH):
            tiles.append(Tile(level, index, tile_width(level, index, size)))
        level += 1
    return tiles


@dataclass(frozen=True, slots=True)
class TileSlice:
    """Where a perfect subtree hash lives: `count` hashes of `tile` from `start`, hashed
    together as a perfect subtree (count is a power of two, at most 128)."""

    tile: Tile
    start: int
    count: int


def locate(level: int, index: int, size: int) -> TileSlice:
    """The tile of a tree of `size` leaves that holds perfect subtree (level, index)."""
    if level < 0 or index < 0 or (index + 1) << level > size:
        raise IndexError(f"no perfect subtree at level {level}, index {index} in size {size}")
    tile_level, rise = divmod(level, TILE_HEIGHT)
    first = index << rise  # index of its first hash at the tile's tree level
    tile_index, start = divmod(first, TILE_WIDTH)
    width = tile_width(tile_level, tile_index, size)
    return TileSlice(Tile(tile_level, tile_index, width), start, 1 << rise)


def hash_from_tile(data: bytes, where: TileSlice) -> bytes:
    """The perfect subtree hash from a tile's bytes (width * 32 bytes, as stored)."""
    size = merkle.HASH_SIZE
    if len(data) != where.tile.width * size:
        raise ValueError(
            f"tile {where.tile.path()} is {len(data)} bytes, expected {where.tile.width * size}"
        )
    hashes = [
        data[i * size : (i + 1) * size] for i in range(where.start, where.start + where.count)
    ]
    while len(hashes) > 1:
        hashes = [merkle.node_hash(hashes[i], hashes[i + 1]) for i in range(0, len(hashes), 2)]
    return hashes[0]


def tile_levels(data: bytes) -> list[list[bytes]]:
    """Every perfect subtree hash inside a tile, from its bytes: level r lists the hashes
    of its aligned runs of 2**r stored hashes (a partial tile: its complete runs only).
    One pass, width - 1 node hashes at most; `levels_slice` then answers any TileSlice of
    the tile without hashing."""
    size = merkle.HASH_SIZE
    if len(data) % size:
        raise ValueError(f"tile bytes of length {len(data)} are not a whole number of hashes")
    sha256 = hashlib.sha256
    level = [data[i : i + size] for i in range(0, len(data), size)]
    levels = [level]
    while len(level) > 1:
        level = [
            sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        levels.append(level)
    return levels


def levels_slice(levels: list[list[bytes]], where: TileSlice) -> bytes:
    """The perfect subtree hash of `where` from its tile's `tile_levels`."""
    rise = where.count.bit_length() - 1
    return levels[rise][where.start >> rise]


def tile_data(tile: Tile, provider: merkle.SubtreeHash) -> bytes:
    """A tile's bytes from perfect subtree hashes: what a log writes when a tile fills."""
    return b"".join(provider(level, i) for level, i in tile.hash_positions())
