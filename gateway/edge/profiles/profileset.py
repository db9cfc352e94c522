"""The loaded firmware profiles: which profile decodes a payload, and hot reload.

A ProfileSet is the gateway's Decoder. It picks the profile by MQTT topic (the
most specific filter wins, see gateway.edge.profiles.topics), or by an explicit
name for gRPC submissions, takes the device id from the profile's topic level,
charges the device's rate limit on arrival, then decodes. Topics no profile claims go to
the fallback profile (the built-in json@1 unless configured otherwise) or are
refused as unknown_topic.

reload() builds a complete new set from the same files and swaps it in with
one assignment; if any file is broken it raises and the running set stays.
Rate-limit state survives a reload.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec

from gateway.common.errors import ConfigError, Rejected
from gateway.edge.profiles import keys
from gateway.edge.profiles.builtin import DEVICE_ID_RE, JsonDecoder
from gateway.edge.profiles.decoder import ProfileDecoder
from gateway.edge.profiles.ratelimit import RateLimiter
from gateway.edge.profiles.spec import Profile, ProfileError, parse_profile, split_share
from gateway.edge.profiles.tomlpos import key_lines
from gateway.edge.profiles.topics import matches, specificity
from gateway.edge.spool import Incoming

if TYPE_CHECKING:
    from gateway.edge.config import GatewayConfig

DEFAULT_PROFILES_DIR = Path("/etc/edge-gateway/profiles")
DEFAULT_KEYS_DIR = Path("/etc/edge-gateway/keys")
BUILTIN_ID = JsonDecoder.profile


class ProfileRejected(Rejected):
    """A Rejected that also says which device and profile it concerns.

    `personal_data` is true when the profile carries subscriber identities: the
    raw payload then holds them in clear, so a dead letter should not quote it.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        device_id: str | None = None,
        profile: str | None = None,
        personal_data: bool = False,
    ) -> None:
        super().__init__(reason, detail)
        self.device_id = device_id
        self.profile = profile
        self.personal_data = personal_data


def _line(profile: Profile, path: tuple[str | int, ...]) -> int:
    try:
        text = profile.source.read_text(encoding="utf-8")
    except OSError:
        return 1
    return key_lines(text).get(path, 1)


def read_profiles(directory: Path) -> list[Profile]:
    """Every *.toml profile in `directory` (not its subdirectories), checked as a set."""
    if not directory.is_dir():
        what = "does not exist" if not directory.exists() else "is not a directory"
        raise ProfileError(f"profiles.dir {directory} {what}")
    try:
        files = sorted(
            p for p in directory.iterdir() if p.suffix == ".toml" and not p.name.startswith(".")
        )
    except OSError as e:
        raise ProfileError(f"profiles.dir {directory} cannot be listed: {e.strerror}") from None
    profiles: list[Profile] = []
    for path in files:
        if path.is_file():
            profiles.append(parse_profile(path))
    check_set(profiles)
    return profiles


def check_set(profiles: Sequence[Profile]) -> None:
    """Refuse two profiles with one name@version, or one topic filter claimed twice."""
    ids: dict[str, Profile] = {}
    claimed: dict[str, Profile] = {}
    for p in profiles:
        if p.id in ids:
            raise ProfileError(
                f"profile {p.source}:{_line(p, ('name',))}: {p.id} is also defined in "
                f"{ids[p.id].source}"
            )
        ids[p.id] = p
        for i, f in enumerate(p.filters):
            other = claimed.get(f)
            if other is not None:
                raise ProfileError(
                    f"profile {p.source}:{_line(p, ('topics', 'filters', i))}: topics.filters "
                    f"{f!r} is also claimed by {other.id} ({other.source})"
                )
            claimed[f] = p
    for p in profiles:
        if p.receipts is None:
            continue
        sample = p.receipts.topic_for("x").split("/")
        for f, other in claimed.items():
            if matches(tuple(f.split("/")), sample):
                raise ProfileError(
                    f"profile {p.source}:{_line(p, ('receipts', 'topic'))}: receipts.topic "
                    f"{p.receipts.topic!r} is a topic devices publish on (topics.filters "
                    f"{f!r} of {other.id}): choose a topic no profile claims"
                )


def bind(
    profiles: Sequence[Profile],
    gateway_id: str,
    keys_dir: Path = DEFAULT_KEYS_DIR,
    pseudonym_key_file: Path | None = None,
) -> list[ProfileDecoder]:
    """Read the key files the profiles name and build their decoders."""
    hmac_files: dict[Path, dict[str, bytes]] = {}
    ecdsa_files: dict[Path, dict[str, ec.EllipticCurvePublicKey]] = {}
    pseudonym_key = None
    out = []
    for p in profiles:
        hmac_keys = public_keys = None
        if p.auth is not None:
            path = Path(p.auth.keys_file)
            if not path.is_absolute():
                path = keys_dir / path
            what = f"profile {p.id} auth.keys_file"
            if p.auth.scheme == "hmac-sha256":
                if path not in hmac_files:
                    hmac_files[path] = keys.read_hmac_keys(path, what)
                hmac_keys = hmac_files[path]
            else:
                if path not in ecdsa_files:
                    ecdsa_files[path] = keys.read_public_keys(path, what)
                public_keys = ecdsa_files[path]
        if p.personal_data and pseudonym_key is None:
            if pseudonym_key_file is None:
                field = next(f for f in p.fields if f.pseudonymise)
                raise ProfileError(
                    f"profile {p.source}:{field.line}: field {field.name} is pseudonymised but "
                    "profiles.pseudonym_key_file is not set: point it at a file of 32 random "
                    "bytes as hex (mode 0600)"
                )
            pseudonym_key = keys.read_pseudonym_key(pseudonym_key_file)
        out.append(
            ProfileDecoder(
                p,
                gateway_id,
                hmac_keys=hmac_keys,
                public_keys=public_keys,
                pseudonym_key=pseudonym_key if p.personal_data else None,
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class _Route:
    rank: tuple[int, ...]
    levels: tuple[str, ...]
    filter: str
    decoder: ProfileDecoder


class _Snapshot:
    """One immutable generation of the set; decode reads it without a lock."""

    def __init__(self, decoders: Sequence[ProfileDecoder], fallback: str | None) -> None:
        self.decoders = {d.id: d for d in decoders}
        if len(self.decoders) != len(decoders):
            raise ProfileError("two profiles share one name@version")
        check_set([d.profile for d in decoders])
        self.by_name: dict[str, list[str]] = {}
        for d in decoders:
            self.by_name.setdefault(d.profile.name, []).append(d.id)
        routes = [
            _Route(specificity(tuple(f.split("/"))), tuple(f.split("/")), f, d)
            for d in decoders
            for f in d.profile.filters
        ]
        routes.sort(key=lambda r: r.rank, reverse=True)
        self.routes = tuple(routes)
        if fallback is not None and fallback != BUILTIN_ID and fallback not in self.decoders:
            raise ProfileError(
                f"profiles.fallback = {fallback!r}: no such profile (loaded: "
                f"{', '.join(sorted([BUILTIN_ID, *self.decoders]))})"
            )
        self.fallback = fallback

    def resolve(self, name: str) -> str:
        if name in (BUILTIN_ID, "json"):
            return BUILTIN_ID
        if name in self.decoders:
            return name
        versions = self.by_name.get(name)
        if versions is not None and len(versions) == 1:
            return versions[0]
        if versions:
            raise Rejected(
                "unknown_profile",
                f"{name[:64]} has versions {', '.join(sorted(versions))}: name one as name@version",
            )
        raise Rejected("unknown_profile", f"no profile {name[:64]!r}")

    def route(self, levels: list[str]) -> _Route | None:
        for r in self.routes:
            if matches(r.levels, levels):
                return r
        return None


class ProfileSet:
    """The gateway's decoder: the loaded profiles plus the built-in json@1."""

    def __init__(
        self,
        decoders: Sequence[ProfileDecoder] = (),
        *,
        gateway_id: str,
        max_payload_bytes: int = 65536,
        fallback: str | None = BUILTIN_ID,
        clock: Callable[[], float] = time.monotonic,
        enforce_rate_limits: bool = True,
        loader: Callable[[], list[ProfileDecoder]] | None = None,
        source: Path | None = None,
    ) -> None:
        self.gateway_id = gateway_id
        self.max_payload_bytes = max_payload_bytes
        self.source = source
        self._json = JsonDecoder(gateway_id, max_payload_bytes)
        self._fallback = fallback
        self._loader = loader
        self._limiter = RateLimiter(clock)
        self._enforce = enforce_rate_limits
        self._snap = _Snapshot(decoders, fallback)

    @classmethod
    def load(
        cls,
        directory: Path | None,
        *,
        gateway_id: str,
        max_payload_bytes: int = 65536,
        keys_dir: Path = DEFAULT_KEYS_DIR,
        pseudonym_key_file: Path | None = None,
        fallback: str | None = BUILTIN_ID,
        clock: Callable[[], float] = time.monotonic,
        enforce_rate_limits: bool = True,
    ) -> ProfileSet:
        """Load every profile in `directory` (None: only json@1) and bind its keys."""

        def loader() -> list[ProfileDecoder]:
            if directory is None:
                return []
            return bind(read_profiles(directory), gateway_id, keys_dir, pseudonym_key_file)

        return cls(
            loader(),
            gateway_id=gateway_id,
            max_payload_bytes=max_payload_bytes,
            fallback=fallback,
            clock=clock,
            enforce_rate_limits=enforce_rate_limits,
            loader=loader,
            source=directory,
        )

    @classmethod
    def from_config(
        cls, cfg: GatewayConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> ProfileSet:
        """The set a gateway configuration names; without [profiles], json@1 alone."""
        pc = cfg.profiles
        if pc is None:
            return cls.load(
                None, gateway_id=cfg.gateway_id, max_payload_bytes=cfg.mqtt.max_payload_bytes
            )
        return cls.load(
            pc.dir,
            gateway_id=cfg.gateway_id,
            max_payload_bytes=cfg.mqtt.max_payload_bytes,
            keys_dir=pc.keys_dir,
            pseudonym_key_file=pc.pseudonym_key_file,
            fallback=pc.fallback,
            clock=clock,
        )

    # ---- the set -------------------------------------------------------------

    def reload(self) -> tuple[str, ...]:
        """Re-read every file; swap in the new set, or raise ConfigError and keep the old."""
        if self._loader is None:
            return self.names()
        snap = _Snapshot(self._loader(), self._fallback)
        self._snap = snap
        return self.names()

    def try_reload(self, log: logging.Logger) -> bool:
        """reload(), logging the outcome; what SIGHUP calls."""
        try:
            names = self.reload()
        except ConfigError as e:
            log.error("profiles reload failed, keeping %s: %s", ", ".join(self.names()), e)
            return False
        log.info("profiles reloaded from %s: %s", self.source, ", ".join(names))
        return True

    def names(self) -> tuple[str, ...]:
        """Every profile id this set decodes, json@1 included."""
        return tuple(sorted([BUILTIN_ID, *self._snap.decoders]))

    def profiles(self) -> tuple[Profile, ...]:
        return tuple(d.profile for d in self._snap.decoders.values())

    def profile(self, name: str) -> Profile | None:
        """A loaded profile by name@version or unique name; None for json@1."""
        ident = self._snap.resolve(name)
        return None if ident == BUILTIN_ID else self._snap.decoders[ident].profile

    def topic_filters(self) -> tuple[str, ...]:
        """The topic filters the profiles claim, most specific first."""
        return tuple(r.filter for r in self._snap.routes)

    def subscriptions(self, share_group: str | None = None) -> tuple[str, ...]:
        """What to subscribe to for the profiles' topics, as a shared subscription if asked."""
        if share_group is None:
            return self.topic_filters()
        return tuple(f"$share/{share_group}/{f}" for f in self.topic_filters())

    def select(self, topic: str) -> tuple[str, str | None]:
        """(profile id, device id from the topic) for an MQTT topic; json@1 for the fallback."""
        levels = split_share(topic).split("/")
        r = self._snap.route(levels)
        if r is not None:
            level = r.decoder.profile.device_id_level
            assert level is not None
            return r.decoder.id, levels[level]
        if self._snap.fallback is None:
            raise Rejected("unknown_topic", f"no profile claims topic {topic[:200]!r}")
        return self._snap.fallback, None

    def device_for_topic(self, topic: str) -> str | None:
        """The device id a profile takes from this topic, or None if none claims it."""
        r = self._snap.route(topic.split("/"))
        if r is None:
            return None
        level = r.decoder.profile.device_id_level
        assert level is not None
        return topic.split("/")[level] or None

    # ---- decoding --------------------------------------------------------------

    def decode(
        self,
        device_id: str | None,
        topic: str,
        payload: bytes,
        received_ms: int,
        channel: str,
        profile: str | None = None,
    ) -> Incoming:
        """Decode one payload; raise ProfileRejected (a Rejected) with a reason otherwise.

        `device_id` is the device as the channel knows it (a fixed MQTT topic
        level, the gRPC submitter's); a profile that names its own topic level
        takes the device id from there instead. `profile` picks a profile by
        name@version (or a unique name) regardless of topic.
        """
        snap = self._snap
        if len(payload) > self.max_payload_bytes:
            raise ProfileRejected(
                "too_large",
                f"{len(payload)} bytes, the gateway allows {self.max_payload_bytes}",
                device_id,
            )
        levels = topic.split("/")
        dec: ProfileDecoder | None = None
        dev = device_id
        try:
            if profile is not None:
                ident = snap.resolve(profile)
                if ident != BUILTIN_ID:
                    dec = snap.decoders[ident]
                    level = dec.profile.device_id_level
                    if level is not None and any(
                        r.decoder is dec and matches(r.levels, levels) for r in snap.routes
                    ):
                        dev = levels[level]
            else:
                r = snap.route(levels)
                if r is not None:
                    dec = r.decoder
                    level = dec.profile.device_id_level
                    assert level is not None
                    dev = levels[level]
                elif snap.fallback is None:
                    raise Rejected("unknown_topic", f"no profile claims topic {topic[:200]!r}")
                elif snap.fallback != BUILTIN_ID:
                    dec = snap.decoders[snap.fallback]
        except Rejected as r:
            raise ProfileRejected(r.reason, r.detail, device_id) from None
        if dec is None:
            try:
                return self._json.decode(dev, topic, payload, received_ms, channel)
            except Rejected as r:
                raise ProfileRejected(r.reason, r.detail, dev, BUILTIN_ID) from None
        p = dec.profile
        if dev is None:
            raise ProfileRejected(
                "unknown_topic", f"no device id in topic {topic[:200]!r}", None, dec.id
            )
        if not DEVICE_ID_RE.fullmatch(dev):
            raise ProfileRejected(
                "bad_device_id", f"device id {dev[:64]!r} is not allowed", dev, dec.id
            )
        # Charged on arrival, by the gateway's clock, before anything the device wrote in
        # the payload (seq, device time) is read: nothing in it can buy tokens.
        rate = p.rate_limit
        if (
            rate is not None
            and self._enforce
            and not self._limiter.allow((p.name, dev), rate.per_s, rate.burst)
        ):
            raise ProfileRejected(
                "rate_limited",
                f"device {dev} is over {rate.per_s:g}/s (burst {rate.burst}) for {p.name}",
                dev,
                dec.id,
                p.personal_data,
            )
        try:
            d = dec.decode(dev, payload, received_ms, channel)
        except Rejected as r:
            raise ProfileRejected(r.reason, r.detail, dev, dec.id, p.personal_data) from None
        return d.incoming
