"""Where each key of a TOML document sits, so errors can name the line.

tomllib returns plain values without positions. This scanner walks a document
tomllib has already accepted and records the line of every key, array element
and array-of-tables entry under its path, e.g. ("fields", 2, "type"). It never
raises: on anything it does not follow it stops and keeps what it has.
"""

from __future__ import annotations

import contextlib
import json

Path = tuple[str | int, ...]

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class _Stop(Exception):
    pass


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines: dict[Path, int] = {}
        self.aot: dict[Path, int] = {}

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < len(self.s) else ""

    def advance(self, n: int = 1) -> None:
        for _ in range(n):
            if self.i >= len(self.s):
                raise _Stop
            if self.s[self.i] == "\n":
                self.line += 1
            self.i += 1

    def skip(self, newlines: bool) -> None:
        while self.i < len(self.s):
            c = self.s[self.i]
            if c in " \t\r" or (newlines and c == "\n"):
                self.advance()
            elif c == "#":
                while self.i < len(self.s) and self.s[self.i] != "\n":
                    self.i += 1
            else:
                return

    def string(self) -> str:
        q = self.peek()
        if self.s.startswith(q * 3, self.i):
            self.advance(3)
            end = self.s.find(q * 3, self.i)
            if end < 0:
                raise _Stop
            while end + 3 < len(self.s) and self.s[end + 3] == q:
                end += 1
            body = self.s[self.i : end]
            self.advance(end + 3 - self.i)
            return body
        self.advance()
        start = self.i
        while self.i < len(self.s) and self.s[self.i] != q:
            if q == '"' and self.s[self.i] == "\\":
                self.advance()
            self.advance()
        body = self.s[start : self.i]
        self.advance()
        if q == '"':
            try:
                decoded: str = json.loads(f'"{body}"')
                return decoded
            except ValueError:
                return body
        return body

    def key(self) -> list[str]:
        parts = []
        while True:
            self.skip(False)
            c = self.peek()
            if c in "\"'":
                parts.append(self.string())
            else:
                start = self.i
                while self.peek() in _BARE and self.peek():
                    self.advance()
                if self.i == start:
                    raise _Stop
                parts.append(self.s[start : self.i])
            self.skip(False)
            if self.peek() != ".":
                return parts
            self.advance()

    def value(self, path: Path) -> None:
        self.skip(False)
        c = self.peek()
        if c in "\"'":
            self.string()
        elif c == "[":
            self.advance()
            n = 0
            while True:
                self.skip(True)
                if self.peek() == "]":
                    self.advance()
                    return
                self.lines.setdefault((*path, n), self.line)
                self.value((*path, n))
                n += 1
                self.skip(True)
                if self.peek() == ",":
                    self.advance()
        elif c == "{":
            self.advance()
            while True:
                self.skip(False)
                if self.peek() == "}":
                    self.advance()
                    return
                line = self.line
                sub = (*path, *self.key())
                self.lines.setdefault(sub, line)
                self.skip(False)
                if self.peek() != "=":
                    raise _Stop
                self.advance()
                self.value(sub)
                self.skip(False)
                if self.peek() == ",":
                    self.advance()
        else:
            while self.peek() and self.peek() not in ",]}#\n":
                self.advance()

    def resolve(self, parts: list[str]) -> Path:
        out: list[str | int] = []
        for p in parts:
            out.append(p)
            idx = self.aot.get(tuple(out))
            if idx is not None:
                out.append(idx)
        return tuple(out)

    def document(self) -> None:
        table: Path = ()
        while True:
            self.skip(True)
            if self.i >= len(self.s):
                return
            line = self.line
            if self.s.startswith("[[", self.i):
                self.advance(2)
                parts = self.key()
                parent = self.resolve(parts[:-1])
                base = (*parent, parts[-1])
                idx = self.aot.get(base, -1) + 1
                self.aot[base] = idx
                table = (*base, idx)
                self.lines.setdefault(base, line)
                self.lines[table] = line
                self.advance(2)
            elif self.peek() == "[":
                self.advance()
                table = self.resolve(self.key())
                self.lines.setdefault(table, line)
                self.advance()
            else:
                path = (*table, *self.key())
                self.lines.setdefault(path, line)
                self.skip(False)
                if self.peek() != "=":
                    raise _Stop
                self.advance()
                self.value(path)


def key_lines(text: str) -> dict[Path, int]:
    """Line (1-based) of every key path found in `text`."""
    sc = _Scanner(text)
    # A document that stops making sense to the scanner keeps the lines found so far.
    with contextlib.suppress(_Stop, RecursionError):
        sc.document()
    return sc.lines


def line_of(lines: dict[Path, int], path: Path) -> int | None:
    """Line of `path`, or of its nearest ancestor the scanner saw."""
    for n in range(len(path), 0, -1):
        found = lines.get(path[:n])
        if found is not None:
            return found
    return None
