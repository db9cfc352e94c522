"""Decoding: a raw device payload becomes a canonical Transaction, or a Rejected.

Pure logic apart from reading profile and key files at load. Firmware
profiles (TOML files, firmware_profiles/README.md) describe each device
family's topics, encoding (JSON, CBOR or a binary record), fields, device
authentication and pseudonymised identities; a ProfileSet routes each payload
to its profile. The built-in `json@1` profile is the gateway's original
format and the default for topics no profile claims.
"""

from __future__ import annotations

from gateway.edge.profiles.builtin import (
    DEVICE_ID_RE,
    MAX_CLOCK_AHEAD_MS,
    MAX_FIELDS_BYTES,
    MAX_SEQ,
    JsonDecoder,
    Rejection,
    parse_json,
)
from gateway.edge.profiles.decoder import Decoded, ProfileDecoder
from gateway.edge.profiles.profileset import (
    BUILTIN_ID,
    DEFAULT_KEYS_DIR,
    DEFAULT_PROFILES_DIR,
    ProfileRejected,
    ProfileSet,
    bind,
    read_profiles,
)
from gateway.edge.profiles.reasons import REASONS
from gateway.edge.profiles.spec import FieldSpec, Profile, ProfileError, parse_profile

__all__ = [
    "BUILTIN_ID",
    "DEFAULT_KEYS_DIR",
    "DEFAULT_PROFILES_DIR",
    "DEVICE_ID_RE",
    "MAX_CLOCK_AHEAD_MS",
    "MAX_FIELDS_BYTES",
    "MAX_SEQ",
    "REASONS",
    "Decoded",
    "FieldSpec",
    "JsonDecoder",
    "Profile",
    "ProfileDecoder",
    "ProfileError",
    "ProfileRejected",
    "ProfileSet",
    "Rejection",
    "bind",
    "parse_json",
    "parse_profile",
    "read_profiles",
]
