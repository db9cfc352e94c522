"""`edge-gateway profiles list | check | decode`: profiles from the operator's seat.

check and list read profile files only; decode also binds the keys a profile
needs, exactly as the service does, and prints the canonical transaction the
gateway would store, or `rejected: <reason>: <detail>` on stderr with exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from gateway._pb.edgegateway.v1 import transaction_pb2
from gateway.common.errors import EXIT_FAILURE, EXIT_OK, Rejected
from gateway.edge.config import load_gateway_config
from gateway.edge.profiles import keys
from gateway.edge.profiles.decoder import Decoded, ProfileDecoder
from gateway.edge.profiles.profileset import (
    BUILTIN_ID,
    DEFAULT_KEYS_DIR,
    DEFAULT_PROFILES_DIR,
    ProfileSet,
    bind,
    read_profiles,
)
from gateway.edge.profiles.spec import Profile, parse_profile
from gateway.edge.profiles.topics import example_topic
from gateway.formats.canonical import tx_id

CLI_GATEWAY_ID = "edge-gateway-cli"
CLI_MAX_PAYLOAD = 16 * 1024 * 1024


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `profiles` subcommands; each sets `profiles_fn`."""
    sub = p.add_subparsers(dest="profiles_cmd", required=True)

    def where(sp: argparse.ArgumentParser, secrets: bool) -> None:
        sp.add_argument("--config", type=Path, help="take [profiles] from this gateway config")
        sp.add_argument("--dir", type=Path, help=f"profiles directory ({DEFAULT_PROFILES_DIR})")
        if secrets:
            sp.add_argument("--keys-dir", type=Path, help=f"device keys ({DEFAULT_KEYS_DIR})")
            sp.add_argument("--pseudonym-key-file", type=Path, help="pseudonymisation key file")

    sp = sub.add_parser("list", help="the profiles in the profiles directory")
    where(sp, False)
    sp.set_defaults(profiles_fn=cmd_list)

    sp = sub.add_parser("check", help="validate a profile file (and its keys file)")
    sp.add_argument("file", type=Path)
    sp.add_argument("--keys-dir", type=Path, help="also read the keys file it names from here")
    sp.set_defaults(profiles_fn=cmd_check)

    sp = sub.add_parser("decode", help="decode one payload as the gateway would")
    sp.add_argument("profile", help="name, name@version, or a profile .toml file")
    sp.add_argument("payload", help="payload file ('-' for standard input)")
    sp.add_argument("--topic", help="the MQTT topic it arrived on (default: one of the profile's)")
    sp.add_argument("--device", default="device-0001", help="device id when no topic is given")
    sp.add_argument("--received-ms", type=int, help="gateway receive time (default: now)")
    sp.add_argument("--channel", default="mqtt", choices=("mqtt", "grpc"))
    sp.add_argument("--gateway-id", help=f"default: the config's, else {CLI_GATEWAY_ID}")
    where(sp, True)
    sp.set_defaults(profiles_fn=cmd_decode)


def _locations(args: argparse.Namespace) -> tuple[Path, Path, Path | None, str, int]:
    """profiles dir, keys dir, pseudonym key file, gateway id, payload cap."""
    profiles_dir, keys_dir, pseudo = DEFAULT_PROFILES_DIR, DEFAULT_KEYS_DIR, None
    gateway_id, cap = CLI_GATEWAY_ID, CLI_MAX_PAYLOAD
    if getattr(args, "config", None) is not None:
        cfg = load_gateway_config(args.config)
        gateway_id, cap = cfg.gateway_id, cfg.mqtt.max_payload_bytes
        if cfg.profiles is not None:
            profiles_dir, keys_dir = cfg.profiles.dir, cfg.profiles.keys_dir
            pseudo = cfg.profiles.pseudonym_key_file
    if getattr(args, "dir", None) is not None:
        profiles_dir = args.dir
    if getattr(args, "keys_dir", None) is not None:
        keys_dir = args.keys_dir
    if getattr(args, "pseudonym_key_file", None) is not None:
        pseudo = args.pseudonym_key_file
    if getattr(args, "gateway_id", None):
        gateway_id = args.gateway_id
    return profiles_dir, keys_dir, pseudo, gateway_id, cap


def _summary(p: Profile) -> list[str]:
    auth = "-" if p.auth is None else f"{p.auth.scheme} ({p.auth.location})"
    return [p.id, p.encoding, p.kind, ", ".join(p.filters) or "(by name)", auth, str(p.source)]


def cmd_list(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    profiles_dir = _locations(args)[0]
    rows = [["PROFILE", "ENCODING", "KIND", "TOPICS", "AUTH", "FILE"]]
    rows += [_summary(p) for p in sorted(read_profiles(profiles_dir), key=lambda p: p.id)]
    rows.append([BUILTIN_ID, "json", "from payload", "(fallback)", "-", "built-in"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip(), file=out)
    return EXIT_OK


def cmd_check(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    p = parse_profile(args.file)
    extra = ""
    if args.keys_dir is not None and p.auth is not None:
        path = Path(p.auth.keys_file)
        path = path if path.is_absolute() else args.keys_dir / path
        what = f"profile {p.id} auth.keys_file"
        n = len(
            keys.read_hmac_keys(path, what)
            if p.auth.scheme == "hmac-sha256"
            else keys.read_public_keys(path, what)
        )
        extra = f", {n} device keys in {path}"
    topics = ", ".join(p.filters) or "none (by name only)"
    print(f"ok: {p.id} ({p.encoding}, {len(p.fields)} fields, topics {topics}{extra})", file=out)
    return EXIT_OK


def transaction_json(leaf: bytes) -> dict[str, Any]:
    """A leaf as the JSON `profiles decode` prints: every Transaction field, and tx_id."""
    tx = transaction_pb2.Transaction.FromString(leaf)
    return {
        "tx_id": tx_id(leaf),
        "device_id": tx.device_id,
        "device_seq": tx.device_seq,
        "device_time_ms": tx.device_time_ms,
        "received_time_ms": tx.received_time_ms,
        "profile": tx.profile,
        "kind": tx.kind,
        "fields": json.loads(tx.fields),
        "fields_canonical": tx.fields.decode("utf-8"),
        "payload_sha256": tx.payload_sha256.hex(),
        "gateway_id": tx.gateway_id,
        "channel": tx.channel,
        "leaf_hex": leaf.hex(),
    }


def cmd_decode(
    args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    profiles_dir, keys_dir, pseudo, gateway_id, cap = _locations(args)
    as_file = Path(args.profile)
    from_file = args.profile.endswith(".toml") and as_file.is_file()
    if from_file:
        profiles, source = [parse_profile(as_file)], as_file.parent
    else:
        profiles, source = read_profiles(profiles_dir), profiles_dir
    payload = sys.stdin.buffer.read() if args.payload == "-" else Path(args.payload).read_bytes()
    received = args.received_ms if args.received_ms is not None else time.time_ns() // 1_000_000
    try:
        # Only the profile asked for is bound to its keys: another profile in the
        # directory whose key file is absent here must not stop this decode.
        routing = ProfileSet(
            [_unkeyed(p, gateway_id) for p in profiles],
            gateway_id=gateway_id,
            max_payload_bytes=cap,
            enforce_rate_limits=False,
            source=source,
        )
        name = profiles[0].id if from_file else args.profile
        wanted = routing.profile(name)
        decoders = [
            bind([p], gateway_id, keys_dir, pseudo)[0] if p is wanted else _unkeyed(p, gateway_id)
            for p in profiles
        ]
        ps = ProfileSet(
            decoders,
            gateway_id=gateway_id,
            max_payload_bytes=cap,
            enforce_rate_limits=False,
            source=source,
        )
        profile = ps.profile(name)
        ident = profile.id if profile is not None else BUILTIN_ID
        topic = args.topic
        if topic is None:
            if profile is not None and profile.filters:
                topic = example_topic(profile.filters[0], profile.device_id_level, args.device)
            else:
                topic = f"grpc/{args.device}"
        elif profile is not None and ps.select(topic)[0] != ident:
            raise Rejected("unknown_topic", f"topic {topic!r} is not claimed by {ident}")
        incoming = ps.decode(args.device, topic, payload, received, args.channel, profile=ident)
    except Rejected as r:
        print(f"rejected: {r.reason}: {r.detail}", file=err)
        return EXIT_FAILURE
    doc = transaction_json(incoming.leaf)
    print(json.dumps(doc, indent=2, ensure_ascii=False), file=out)
    return EXIT_OK


class _RoutingOnly(ProfileDecoder):
    """A profile not asked for, without its keys: it claims its topics, so routing and
    the --topic check see the whole set as the gateway does, but it decodes nothing."""

    def decode(self, device_id: str, payload: bytes, received_ms: int, channel: str) -> Decoded:
        raise Rejected("unknown_profile", f"{self.id} is not the profile being decoded")


def _unkeyed(profile: Profile, gateway_id: str) -> ProfileDecoder:
    empty: dict[str, Any] = {}
    return _RoutingOnly(
        profile,
        gateway_id,
        hmac_keys=empty,
        public_keys=empty,
        pseudonym_key=b"" if profile.personal_data else None,
    )
