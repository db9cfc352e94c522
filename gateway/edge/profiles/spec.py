"""Firmware profile files: TOML in, a validated, frozen Profile out.

One file describes one firmware family and version: the topics it claims, its
encoding, where each field sits and what values it may take. Every mistake is
a ProfileError naming the file, the line, the key, the value and what is
allowed, e.g.
  profile /etc/edge-gateway/profiles/meter.toml:31: fields[2].type = 'u17': expected one of ...
Reading a profile touches no secret: key files are read when a ProfileSet
binds them (gateway.edge.profiles.keys). firmware_profiles/README.md documents
every key.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.common.errors import ConfigError
from gateway.edge.profiles import strictjson
from gateway.edge.profiles.tomlpos import Path as KeyPath
from gateway.edge.profiles.tomlpos import key_lines, line_of
from gateway.edge.profiles.topics import matches


class ProfileError(ConfigError):
    """A profile file (or a key file it names) cannot be used; the message says where."""


ENCODINGS = ("json", "cbor", "binary")
JSON_TYPES = ("int", "number", "string", "bool")
CBOR_TYPES = ("int", "number", "string", "bool", "bytes")
# wire type -> (struct code, size, logical type)
BINARY_TYPES: dict[str, tuple[str, int, str]] = {
    "u8": ("B", 1, "int"),
    "u16": ("H", 2, "int"),
    "u32": ("I", 4, "int"),
    "u64": ("Q", 8, "int"),
    "i8": ("b", 1, "int"),
    "i16": ("h", 2, "int"),
    "i32": ("i", 4, "int"),
    "i64": ("q", 8, "int"),
    "f32": ("f", 4, "number"),
    "f64": ("d", 8, "number"),
    "bool": ("B", 1, "bool"),
    "bytes": ("", 0, "bytes"),
    "ascii": ("", 0, "string"),
}
TIME_UNITS = ("s", "ms", "us", "rfc3339")
FORMATS = ("digits", "hex", "printable")
PSEUDONYM_CLASSES = ("imsi", "msisdn", "iccid", "eid")
AUTH_SCHEMES = ("hmac-sha256", "ecdsa-p256")
MAX_SEQ = 2**63 - 1

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,31}$")
KIND_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
FIELD_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
FLAG_RE = re.compile(r"^([a-z][a-z0-9_]{0,63})?$")
FIELD_KEYS = (
    "type",
    "required",
    "unit",
    "description",
    "scale",
    "bias",
    "min",
    "max",
    "enum",
    "length",
    "min_length",
    "max_length",
    "format",
    "flags",
    "absent",
    "pseudonymise",
)
TOP_KEYS = (
    "name",
    "version",
    "description",
    "encoding",
    "kind",
    "max_payload_bytes",
    "unknown_fields",
    "topics",
    "binary",
    "sequence",
    "device_time",
    "rate_limit",
    "auth",
    "receipts",
    "fields",
)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field: where it sits in the payload and what it may hold."""

    name: str
    type: str  # as written: a logical type, or a binary wire type
    kind: str  # logical: int | number | string | bool | bytes
    required: bool
    path: tuple[str | int, ...]  # JSON pointer tokens or CBOR key path; () for binary
    where: str  # how messages name the source: "/pos/lat", "key 3", "offset 8"
    offset: int | None = None
    length: int | None = None
    unit: str | None = None
    scale: int | float | None = None
    bias: int | float | None = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    enum: tuple[str | int, ...] | None = None
    min_length: int | None = None
    max_length: int | None = None
    format: str | None = None
    flags: tuple[str, ...] | None = None
    absent: int | None = None
    pseudonymise: str | None = None
    line: int = 0


@dataclass(frozen=True, slots=True)
class TimeSpec:
    field: str
    unit: str
    max_ahead_ms: int
    replay_window_ms: int | None


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    per_s: float
    burst: int


@dataclass(frozen=True, slots=True)
class AuthSpec:
    scheme: str
    keys_file: str  # as written; relative to profiles.keys_dir
    location: str  # trailer | field
    field: str | None
    tag_encoding: str  # hex | base64url (field only)
    signature_format: str  # raw | der (ecdsa only)

    @property
    def trailer_bytes(self) -> int:
        return 32 if self.scheme == "hmac-sha256" else 64


@dataclass(frozen=True, slots=True)
class ReceiptSpec:
    """[receipts]: once a transaction of this profile is committed, the gateway publishes
    its receipt (gateway.formats.receipt) on `topic` with `{device}` replaced by the
    device id, QoS 1, below mqtt.mount_point."""

    topic: str

    def topic_for(self, device_id: str) -> str:
        return self.topic.replace(DEVICE_PLACEHOLDER, device_id)

    @property
    def topic_filter(self) -> str:
        """Every device's receipt topic, as an MQTT filter."""
        return self.topic.replace(DEVICE_PLACEHOLDER, "+")


DEVICE_PLACEHOLDER = "{device}"
DEFAULT_RECEIPT_TOPIC = "receipts/{device}"


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    version: str
    description: str
    encoding: str
    kind: str
    max_payload_bytes: int
    unknown_fields: str  # ignore | reject
    filters: tuple[str, ...]
    device_id_level: int | None
    sequence_field: str
    time: TimeSpec | None
    rate_limit: RateLimitSpec | None
    auth: AuthSpec | None
    byte_order: str | None  # binary: big | little
    record_length: int | None  # binary: bytes, without an auth trailer
    fields: tuple[FieldSpec, ...]
    source: Path
    receipts: ReceiptSpec | None = None

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def personal_data(self) -> bool:
        """True if some field carries a subscriber identity (pseudonymised before storage)."""
        return any(f.pseudonymise for f in self.fields)


# ---- reading ----------------------------------------------------------------


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dotted(path: KeyPath) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


class _Ctx:
    def __init__(self, source: Path, text: str) -> None:
        self.source = source
        self.text = text
        self._lines: dict[KeyPath, int] | None = None

    def line(self, path: KeyPath) -> int:
        if self._lines is None:
            self._lines = key_lines(self.text)
        return line_of(self._lines, path) or 1

    def fail(self, path: KeyPath, value: object, allowed: str) -> ProfileError:
        return ProfileError(
            f"profile {self.source}:{self.line(path)}: {_dotted(path)} = {_show(value)}: {allowed}"
        )

    def missing(self, path: KeyPath, why: str) -> ProfileError:
        return ProfileError(
            f"profile {self.source}:{self.line(path[:-1]) if len(path) > 1 else 1}: "
            f"{_dotted(path)} is missing: {why}"
        )


_MISSING: Any = object()


class _Table:
    """One TOML table; every getter names the key on error, finish() refuses unknown keys."""

    def __init__(self, data: Mapping[str, Any], path: KeyPath, ctx: _Ctx) -> None:
        self.data = data
        self.path = path
        self.ctx = ctx
        self.seen: set[str] = set()

    def p(self, name: str) -> KeyPath:
        return (*self.path, name)

    def fail(self, name: str, value: object, allowed: str) -> ProfileError:
        return self.ctx.fail(self.p(name), value, allowed)

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, why_required: str | None = None) -> Any:
        self.seen.add(name)
        if name in self.data:
            return self.data[name]
        if why_required is not None:
            raise self.ctx.missing(self.p(name), why_required)
        return _MISSING

    def table(self, name: str, required: str | None = None) -> _Table | None:
        v = self.raw(name, required)
        if v is _MISSING:
            return None
        if not isinstance(v, dict):
            raise self.fail(name, v, "expected a table")
        return _Table(v, self.p(name), self.ctx)

    def string(
        self,
        name: str,
        default: str | None = None,
        *,
        required: str | None = None,
        choices: tuple[str, ...] = (),
        pattern: re.Pattern[str] | None = None,
        rule: str = "",
        max_len: int = 1024,
    ) -> str | None:
        v = self.raw(name, required)
        if v is _MISSING:
            return default
        if not isinstance(v, str) or not v or len(v) > max_len:
            raise self.fail(name, v, f"expected a non-empty string of at most {max_len} characters")
        if choices and v not in choices:
            raise self.fail(name, v, f"expected one of {', '.join(choices)}")
        if pattern is not None and not pattern.match(v):
            raise self.fail(name, v, rule)
        return v

    def integer(self, name: str, default: int | None, lo: int, hi: int) -> int | None:
        v = self.raw(name)
        if v is _MISSING:
            return default
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self.fail(name, v, f"expected an integer from {lo} to {hi}")
        return v

    def number(self, name: str, lo: float = -math.inf, hi: float = math.inf) -> int | float | None:
        v = self.raw(name)
        if v is _MISSING:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(name, v, "expected a finite number")
        if not lo <= v <= hi:
            raise self.fail(name, v, f"expected a number from {lo:g} to {hi:g}")
        return v

    def boolean(self, name: str, default: bool) -> bool:
        v = self.raw(name)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            raise self.fail(name, v, "expected true or false")
        return v

    def expect(self, *names: str) -> None:
        """Refuse unknown keys first: a misspelt key is the likeliest cause of what follows."""
        unknown = [k for k in self.data if k not in names]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(names)})"
            raise self.fail(k, self.data[k], "unknown key" + hint)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            k = unknown[0]
            raise self.fail(k, self.data[k], "unknown key (check the spelling)")


def split_share(topic_filter: str) -> str:
    """The filter without a `$share/<group>/` prefix (MQTT 5 shared subscriptions)."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else ""
    return topic_filter


def filter_problem(topic_filter: str) -> str | None:
    """Why `topic_filter` is not a valid MQTT topic filter, or None."""
    if not topic_filter or len(topic_filter.encode("utf-8")) > 65535 or "\x00" in topic_filter:
        return "expected a non-empty MQTT topic filter"
    levels = topic_filter.split("/")
    for i, lv in enumerate(levels):
        if "#" in lv and (lv != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in lv and lv != "+":
            return "'+' must be a whole level"
    return None


def _topics(t: _Table | None, ctx: _Ctx) -> tuple[tuple[str, ...], int | None]:
    if t is None:
        return (), None
    t.expect("filters", "device_id_level")
    raw = t.raw("filters", "list the MQTT topic filters this profile claims")
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise t.fail("filters", raw, "expected a list of MQTT topic filters")
    filters: list[str] = []
    for i, f in enumerate(raw):
        stripped = split_share(f)
        problem = filter_problem(stripped)
        if problem:
            raise ctx.fail((*t.path, "filters", i), f, problem)
        if stripped in filters:
            raise ctx.fail((*t.path, "filters", i), f, "listed twice")
        filters.append(stripped)
    level = t.integer("device_id_level", None, 0, 64)
    if filters and level is None:
        raise ctx.missing(
            (*t.path, "device_id_level"), "name the topic level (0 = first) holding the device id"
        )
    for i, f in enumerate(filters):
        levels = f.split("/")
        assert level is not None
        if level >= len(levels) or levels[level] != "+":
            raise ctx.fail(
                (*t.path, "filters", i),
                raw[i],
                f"level {level} (topics.device_id_level) must be '+': the device id sits there",
            )
    t.finish()
    return tuple(filters), level


def receipt_topic_problem(topic: str) -> str | None:
    """Why `topic` is no receipt topic template, or None: an MQTT topic name (no
    wildcard, no leading '$' or '/') with `{device}` as one whole level, once."""
    levels = topic.split("/")
    if (
        levels.count(DEVICE_PLACEHOLDER) != 1
        or topic.count("{") != 1
        or "}" in topic.replace(DEVICE_PLACEHOLDER, "")
    ):
        return "expected a topic with {device} as one whole level, once, e.g. receipts/{device}"
    if any(c in topic for c in "+#\x00") or topic.startswith(("$", "/")) or "" in levels:
        return "expected a topic name: no '+', '#', empty level or leading '$'"
    return None


def _receipts(t: _Table | None, filters: tuple[str, ...]) -> ReceiptSpec | None:
    if t is None:
        return None
    t.expect("enabled", "topic")
    enabled = t.boolean("enabled", False)
    topic = t.string("topic", DEFAULT_RECEIPT_TOPIC, max_len=256)
    assert topic is not None
    problem = receipt_topic_problem(topic)
    if problem is not None:
        raise t.fail("topic", topic, problem)
    sample = topic.replace(DEVICE_PLACEHOLDER, "x").split("/")
    for f in filters:
        if matches(tuple(f.split("/")), sample):
            raise t.fail(
                "topic",
                topic,
                f"devices publish there (topics.filters {f!r}): devices read receipts",
            )
    t.finish()
    return ReceiptSpec(topic) if enabled else None


def _enum(ft: _Table, kind: str) -> tuple[str | int, ...] | None:
    v = ft.raw("enum")
    if v is _MISSING:
        return None
    ok = isinstance(v, list) and bool(v)
    if ok and kind == "string":
        ok = all(isinstance(x, str) for x in v)
    elif ok and kind == "int":
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    else:
        ok = False
    if not ok:
        raise ft.fail("enum", v, "expected a non-empty list of strings (string fields) or ints")
    if len(set(v)) != len(v):
        raise ft.fail("enum", v, "values must be unique")
    return tuple(v)


def _field(ft: _Table, encoding: str, ctx: _Ctx) -> tuple[FieldSpec, tuple[int, int] | None]:
    where_key = {"json": "pointer", "cbor": "key", "binary": "offset"}[encoding]
    ft.expect("name", where_key, *FIELD_KEYS)
    name = ft.string(
        "name",
        required="every field needs a name",
        pattern=FIELD_RE,
        rule="expected a-z, 0-9 and '_', starting with a letter, at most 64 characters",
    )
    assert name is not None
    allowed = JSON_TYPES if encoding == "json" else CBOR_TYPES if encoding == "cbor" else ()
    if encoding == "binary":
        ftype = ft.string("type", required="e.g. u16", choices=tuple(BINARY_TYPES), max_len=16)
        assert ftype is not None
        kind = BINARY_TYPES[ftype][2]
    else:
        ftype = ft.string("type", required="e.g. int", choices=allowed, max_len=16)
        assert ftype is not None
        kind = ftype

    path: tuple[str | int, ...] = ()
    offset = length = None
    span: tuple[int, int] | None = None
    if encoding == "json":
        text = ft.string("pointer", required="where the field sits: a JSON pointer, e.g. /pos/lat")
        assert text is not None
        try:
            path = strictjson.pointer(text)
        except ValueError as e:
            raise ft.fail("pointer", text, f"not an RFC 6901 JSON pointer: {e}") from None
        if not path:
            raise ft.fail("pointer", text, "must name a member, not the whole document")
        where = text
    elif encoding == "cbor":
        key = ft.raw("key", "where the field sits: a CBOR map key, or a list of keys")
        keys = key if isinstance(key, list) else [key]
        if not keys or not all(
            (isinstance(k, int) and not isinstance(k, bool) and -(2**63) <= k < 2**63)
            or (isinstance(k, str) and 0 < len(k) <= 256)
            for k in keys
        ):
            raise ft.fail("key", key, "expected an integer or text map key, or a list of them")
        path = tuple(keys)
        where = "key " + "/".join(str(k) for k in keys)
    else:
        offset = ft.integer("offset", None, 0, 65535)
        if offset is None:
            raise ctx.missing(ft.p("offset"), "the field's byte offset in the record")
        where = f"offset {offset}"
        size = BINARY_TYPES[ftype][1]
        if ftype in ("bytes", "ascii"):
            length = ft.integer("length", None, 1, 65535)
            if length is None:
                raise ctx.missing(ft.p("length"), f"{ftype} fields need a length in bytes")
            size = length
        span = (offset, offset + size)
    if encoding != "binary" or ftype not in ("bytes", "ascii"):
        # CBOR byte strings may pin an exact length; other types have none.
        length = ft.integer("length", None, 1, 65535) if kind == "bytes" else None

    numeric = kind in ("int", "number")
    sized = kind in ("string", "bytes")
    unit = ft.string("unit", max_len=32)
    ft.string("description", max_len=1024)
    scale = ft.number("scale")
    bias = ft.number("bias")
    minimum = ft.number("min")
    maximum = ft.number("max")
    for key, val in (("scale", scale), ("bias", bias), ("min", minimum), ("max", maximum)):
        if val is not None and not numeric:
            raise ft.fail(key, val, f"only numeric fields take {key}; this one is {ftype}")
    if scale == 0:
        raise ft.fail("scale", scale, "expected a non-zero number")
    if minimum is not None and maximum is not None and minimum > maximum:
        raise ft.fail("min", minimum, f"greater than max ({maximum})")
    enum = _enum(ft, kind) if ft.has("enum") else None
    min_length = ft.integer("min_length", None, 0, 1 << 20)
    max_length = ft.integer("max_length", None, 0, 1 << 20)
    for key, val in (("min_length", min_length), ("max_length", max_length)):
        if val is not None and not sized:
            raise ft.fail(key, val, "only string and bytes fields take a length limit")
    if min_length is not None and max_length is not None and min_length > max_length:
        raise ft.fail("min_length", min_length, f"greater than max_length ({max_length})")
    fmt = ft.string("format", choices=FORMATS)
    if fmt is not None and kind != "string":
        raise ft.fail("format", fmt, "only string fields take a format")

    flags = None
    raw_flags = ft.raw("flags")
    if raw_flags is not _MISSING:
        bits = BINARY_TYPES[ftype][1] * 8 if encoding == "binary" else 64
        if kind != "int" or (encoding == "binary" and ftype.startswith("i")):
            raise ft.fail("flags", raw_flags, "only unsigned integer fields carry flags")
        if (
            not isinstance(raw_flags, list)
            or not raw_flags
            or len(raw_flags) > bits
            or not all(isinstance(x, str) and FLAG_RE.match(x) for x in raw_flags)
        ):
            raise ft.fail(
                "flags",
                raw_flags,
                f"expected a list of at most {bits} bit names, bit 0 first ('' for unused bits)",
            )
        named = [x for x in raw_flags if x]
        if len(set(named)) != len(named):
            raise ft.fail("flags", raw_flags, "bit names must be unique")
        if scale is not None or bias is not None or minimum is not None or maximum is not None:
            raise ft.fail("flags", raw_flags, "a flags field takes no scale, bias, min or max")
        flags = tuple(raw_flags)

    absent = None
    if ft.has("absent"):
        if encoding != "binary" or kind != "int":
            raise ft.fail("absent", ft.raw("absent"), "only binary integer fields take absent")
        code, size, _ = BINARY_TYPES[ftype]
        bits = size * 8
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if code.islower() else (0, 2**bits - 1)
        absent = ft.integer("absent", None, lo, hi)

    pseudo = ft.string("pseudonymise", choices=PSEUDONYM_CLASSES)
    if pseudo is not None and (kind != "string" or enum is not None or fmt is not None):
        raise ft.fail(
            "pseudonymise", pseudo, "only plain string fields (no enum, no format) take it"
        )
    required = ft.boolean("required", True)
    line = ctx.line(ft.path)
    ft.finish()
    spec = FieldSpec(
        name=name,
        type=ftype,
        kind=kind,
        required=required,
        path=path,
        where=where,
        offset=offset,
        length=length,
        unit=unit,
        scale=scale,
        bias=bias,
        minimum=minimum,
        maximum=maximum,
        enum=enum,
        min_length=min_length,
        max_length=max_length,
        format=fmt,
        flags=flags,
        absent=absent,
        pseudonymise=pseudo,
        line=line,
    )
    return spec, span


def _prefix_clash(paths: list[tuple[tuple[str | int, ...], int]]) -> tuple[int, int] | None:
    """Two fields where one's path is the other's or lies inside it."""
    for a in range(len(paths)):
        for b in range(len(paths)):
            pa, pb = paths[a][0], paths[b][0]
            if a != b and len(pa) <= len(pb) and pb[: len(pa)] == pa:
                return paths[a][1], paths[b][1]
    return None


def parse_profile_text(text: str, source: Path) -> Profile:
    """Validate one profile document; `source` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"profile {source}: not valid TOML: {e}") from None
    ctx = _Ctx(source, text)
    root = _Table(data, (), ctx)
    root.expect(*TOP_KEYS)
    name = root.string(
        "name",
        required="the firmware family, e.g. nbiot-meter",
        pattern=NAME_RE,
        rule="expected lower-case letters, digits and '-', at most 63 characters",
    )
    assert name is not None
    if name == "json":
        raise root.fail("name", name, "'json' is the built-in json@1 profile; choose another")
    raw_version = root.raw("version", 'the firmware version, e.g. 1 or "2.3"')
    version = str(raw_version) if isinstance(raw_version, int | str) else ""
    if isinstance(raw_version, bool) or not VERSION_RE.match(version):
        raise root.fail(
            "version", raw_version, "expected an integer or a string of letters, digits, . _ -"
        )
    description = root.string("description", "", max_len=4096) or ""
    encoding = root.string("encoding", required="json, cbor or binary", choices=ENCODINGS)
    assert encoding is not None
    kind = root.string(
        "kind",
        required="the transaction kind, e.g. meter.reading",
        pattern=KIND_RE,
        rule="expected lower-case letters, digits, '.', '_' and '-', at most 64 characters",
    )
    assert kind is not None
    max_payload = root.integer("max_payload_bytes", 4096, 1, 16 * 1024 * 1024)
    assert max_payload is not None
    unknown = root.string("unknown_fields", "ignore", choices=("ignore", "reject"))
    assert unknown is not None
    if encoding == "binary" and root.has("unknown_fields"):
        raise root.fail("unknown_fields", unknown, "a binary record has no unknown fields")

    filters, level = _topics(root.table("topics"), ctx)

    byte_order = record_length = None
    bt = root.table(
        "binary", "binary profiles need byte_order and length" if encoding == "binary" else None
    )
    if bt is not None:
        if encoding != "binary":
            raise root.fail("binary", bt.data, "only binary profiles have a [binary] table")
        bt.expect("byte_order", "length")
        byte_order = bt.string("byte_order", required="big or little", choices=("big", "little"))
        record_length = bt.integer("length", None, 1, 65535)
        if record_length is None:
            raise ctx.missing(bt.p("length"), "the record's length in bytes")
        bt.finish()

    raw_fields = root.raw("fields", "describe the payload's fields as [[fields]] tables")
    if not isinstance(raw_fields, list) or not raw_fields:
        raise root.fail("fields", raw_fields, "expected [[fields]] tables")
    fields: list[FieldSpec] = []
    spans: list[tuple[tuple[int, int], int]] = []
    for i, raw in enumerate(raw_fields):
        if not isinstance(raw, dict):
            raise ctx.fail(("fields", i), raw, "expected a table")
        spec, span = _field(_Table(raw, ("fields", i), ctx), encoding, ctx)
        if any(f.name == spec.name for f in fields):
            raise ctx.fail(("fields", i, "name"), spec.name, "another field has this name")
        if span is not None:
            assert record_length is not None
            if span[1] > record_length:
                raise ctx.fail(
                    ("fields", i, "offset"),
                    span[0],
                    f"the field ends at byte {span[1]}, past the record's {record_length} bytes",
                )
            for other, j in spans:
                if span[0] < other[1] and other[0] < span[1]:
                    raise ctx.fail(
                        ("fields", i, "offset"), span[0], f"overlaps fields[{j}] ({fields[j].name})"
                    )
            spans.append((span, i))
        fields.append(spec)
    if encoding != "binary":
        clash = _prefix_clash([(f.path, i) for i, f in enumerate(fields)])
        if clash is not None:
            a, b = clash
            raise ctx.fail(
                ("fields", b, "pointer" if encoding == "json" else "key"),
                fields[b].where,
                f"lies at or inside fields[{a}] ({fields[a].where})",
            )
    by_name = {f.name: (i, f) for i, f in enumerate(fields)}

    st = root.table("sequence", "name the device sequence number field: [sequence] field = ...")
    assert st is not None
    st.expect("field")
    seq_name = st.string("field", required="the name of an int field")
    assert seq_name is not None
    if seq_name not in by_name:
        raise st.fail("field", seq_name, "no field has this name")
    seq = by_name[seq_name][1]
    if seq.kind != "int" or seq.scale or seq.bias or seq.flags or not seq.required:
        raise st.fail(
            "field", seq_name, "the sequence field must be a required int without scale or flags"
        )
    if seq.absent is not None:
        raise st.fail("field", seq_name, "the sequence field cannot have an absent value")
    st.finish()

    time = None
    tt = root.table("device_time")
    if tt is not None:
        tt.expect("field", "unit", "max_ahead_s", "replay_window_s")
        t_name = tt.string("field", required="the name of the device time field")
        assert t_name is not None
        if t_name not in by_name:
            raise tt.fail("field", t_name, "no field has this name")
        if t_name == seq_name:
            raise tt.fail("field", t_name, "is the sequence field")
        unit = tt.string("unit", required="s, ms, us or rfc3339", choices=TIME_UNITS)
        tf = by_name[t_name][1]
        want = (
            ("string",)
            if unit == "rfc3339"
            else ("int",)
            if unit in ("ms", "us")
            else (
                "int",
                "number",
            )
        )
        if tf.kind not in want or tf.scale or tf.bias or tf.flags or tf.enum:
            raise tt.fail(
                "unit", unit, f"field {t_name} is {tf.type}; unit {unit} needs {' or '.join(want)}"
            )
        ahead = tt.integer("max_ahead_s", 300, 0, 10 * 365 * 86400)
        window = tt.integer("replay_window_s", None, 1, 100 * 365 * 86400)
        assert ahead is not None and unit is not None
        time = TimeSpec(
            field=t_name,
            unit=unit,
            max_ahead_ms=ahead * 1000,
            replay_window_ms=window * 1000 if window is not None else None,
        )
        tt.finish()

    rate = None
    rt = root.table("rate_limit")
    if rt is not None:
        rt.expect("per_s", "burst")
        per_s = rt.number("per_s", 1e-6, 1e6)
        if per_s is None:
            raise ctx.missing(rt.p("per_s"), "the sustained transactions per second per device")
        burst = rt.integer("burst", max(1, math.ceil(per_s)), 1, 10**6)
        assert burst is not None
        rate = RateLimitSpec(per_s=float(per_s), burst=burst)
        rt.finish()

    auth = None
    at = root.table("auth")
    if at is not None:
        at.expect("scheme", "keys_file", "location", "field", "tag_encoding", "signature_format")
        scheme = at.string("scheme", required="hmac-sha256 or ecdsa-p256", choices=AUTH_SCHEMES)
        keys_file = at.string(
            "keys_file", required="the device keys file, relative to profiles.keys_dir"
        )
        location = at.string("location", "trailer", choices=("trailer", "field"))
        assert scheme is not None and keys_file is not None and location is not None
        member = None
        tag_encoding: str | None = "base64url"
        if location == "field":
            if encoding != "json":
                raise at.fail("location", location, "only json profiles carry the tag in a field")
            member = at.string("field", required="the top-level member holding the tag")
            tag_encoding = at.string("tag_encoding", "base64url", choices=("hex", "base64url"))
            assert member is not None and tag_encoding is not None
            for f in fields:
                if f.path[0] == member:
                    raise at.fail("field", member, f"is field {f.name}'s member")
        sig_format = "raw"
        if scheme == "ecdsa-p256":
            sig_format = at.string("signature_format", "raw", choices=("raw", "der")) or "raw"
            if sig_format == "der" and location == "trailer":
                raise at.fail(
                    "signature_format", sig_format, "a trailer has a fixed size: use raw (r || s)"
                )
        auth = AuthSpec(
            scheme=scheme,
            keys_file=keys_file,
            location=location,
            field=member,
            tag_encoding=tag_encoding or "base64url",
            signature_format=sig_format,
        )
        at.finish()

    receipts = _receipts(root.table("receipts"), filters)

    if encoding == "binary":
        assert record_length is not None
        need = record_length + (auth.trailer_bytes if auth and auth.location == "trailer" else 0)
        if max_payload < need:
            raise root.fail(
                "max_payload_bytes", max_payload, f"smaller than the {need}-byte record"
            )
    root.finish()
    return Profile(
        name=name,
        version=version,
        description=description,
        encoding=encoding,
        kind=kind,
        max_payload_bytes=max_payload,
        unknown_fields=unknown,
        filters=filters,
        device_id_level=level,
        sequence_field=seq_name,
        time=time,
        rate_limit=rate,
        auth=auth,
        byte_order=byte_order,
        record_length=record_length,
        fields=tuple(fields),
        source=source,
        receipts=receipts,
    )


def parse_profile(path: Path) -> Profile:
    """Read and validate one profile file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ProfileError(f"profile {path} does not exist") from None
    except OSError as e:
        raise ProfileError(f"profile {path} cannot be read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProfileError(f"profile {path}: not UTF-8 (byte {e.start})") from None
    return parse_profile_text(text, path)
