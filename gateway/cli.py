"""`edge-gateway`: the operator's command line.

Expected failures print one line naming the thing, the value and the fix, and
exit with a documented code (gateway.common.errors); tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from gateway import __version__
from gateway.common.errors import (
    EXIT_IOERR,
    EXIT_NOPERM,
    EXIT_SOFTWARE,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    GatewayError,
    OutputFileError,
)
from gateway.edge.config import DEFAULT_PATH, load_gateway_config


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.common import logs
    from gateway.edge import service

    cfg = load_gateway_config(args.config)
    logs.configure(cfg.log_level)
    return service.run(cfg)


def _cmd_hsm(args: argparse.Namespace) -> int:
    from gateway.edge import provision, signer

    cfg = load_gateway_config(args.config)
    # Root reads a root-only PIN (a credential's source beside the config); the token is
    # then used as the service's user, so the objects it creates stay the service's.
    pin = provision.read_pin(cfg)
    acct = provision.service_account(args.user)
    if args.hsm_cmd == "rotate":
        from gateway.edge import rotator

        info, number = provision.run_as(acct, lambda: rotator.rotate(cfg, pin))
        print(f"rotation {number}: new log key created; `systemctl reload edge-gateway`")
        print("(SIGHUP) or the next start appends the rotation entry to the log")
    else:
        make = signer.init_key if args.hsm_cmd == "init" else signer.key_info
        info = provision.run_as(acct, lambda: make(cfg.hsm, pin))
    print(f"token:       {info.token_label} (serial {info.token_serial}, {info.token_model})")
    print(f"key:         label {info.key_label!r}, CKA_ID {info.cka_id.hex()}")
    print(f"sensitive:   {info.sensitive}   extractable: {info.extractable}")
    print(f"key_id:      {info.key_id.hex()}")
    print(info.public_pem.decode("ascii"), end="")
    if args.pem_out:
        try:
            args.pem_out.write_bytes(info.public_pem)
        except OSError as e:
            raise OutputFileError(
                f"--pem-out {args.pem_out} cannot be written: {e.strerror or e}; the key is "
                "on the token: run again with a writable path"
            ) from None
        print(f"public key written to {args.pem_out}")
    return 0


def _cmd_ledger(args: argparse.Namespace) -> int:
    from gateway.common import logs
    from gateway.ledger import node as ledger
    from gateway.ledger.config import load_ledger_config

    if args.config is None:
        print(
            "edge-gateway ledger-node: --config F runs the node; "
            "keygen --name N --out F writes its witness key",
            file=sys.stderr,
        )
        return EXIT_USAGE
    cfg = load_ledger_config(args.config)
    logs.configure("info")
    return ledger.run(cfg)


def _cmd_ledger_keygen(args: argparse.Namespace) -> int:
    from gateway.ledger import witness

    return witness.cmd_keygen(args.name, args.out)


def _cmd_status(args: argparse.Namespace) -> int:
    from gateway.edge import client

    return asyncio.run(client.print_status(client.ClientOptions.from_args(args), as_json=args.json))


def _cmd_proof(args: argparse.Namespace) -> int:
    from gateway.edge import client

    return asyncio.run(
        client.check_proof(
            client.ClientOptions.from_args(args),
            args.tx_id,
            args.public_key,
            client.LogTrust.from_args(args),
        )
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from gateway.edge import export

    cfg = load_gateway_config(args.config)
    export.check_arguments(args.sample, args.since)
    export.check_out_dir(args.out, args.force)  # before the HSM is asked for anything
    if args.public_key:
        pems = [Path(p).read_bytes() for p in args.public_key]
    else:
        from gateway.edge import provision, rotator

        pin = provision.read_pin(cfg)
        acct = provision.service_account(args.user)
        # Every key of the log: the configured one and each key rotation's.
        pems = provision.run_as(acct, lambda: rotator.log_public_pems(cfg, pin))
    witnesses = dict(cfg.log.witnesses) if cfg.log is not None else {}
    for vkey in args.witness or ():
        witnesses[vkey.split("+", 1)[0].rsplit("/", 1)[-1]] = vkey
    result = export.export(
        cfg.spool.path,
        args.out,
        gateway_id=cfg.gateway_id,
        origin=cfg.log_origin,
        public_pems=pems,
        witnesses=witnesses,
        sample=args.sample,
        since=args.since,
        force=args.force,
    )
    print(result.line())
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from gateway.lab import simulate

    result = asyncio.run(simulate.run(simulate.SimulateOptions.from_args(args)))
    print(result.line())
    return 0


def _simulate_arguments(p: argparse.ArgumentParser) -> None:
    from gateway.lab.simulate import add_arguments

    add_arguments(p)


def _cmd_profiles(args: argparse.Namespace) -> int:
    code: int = args.profiles_fn(args)
    return code


def _cmd_pki(args: argparse.Namespace) -> int:
    from gateway.lab import pki

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    made = pki.make_dev_pki(args.out, hosts, args.days, force=args.force, group=args.group)
    print("\n".join(pki.describe(made, hosts)))
    if args.group:
        print(f"leaf keys: mode 0640, group {args.group}; ca.key: mode 0600")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.lab import demo

    return demo.main(
        seconds=args.seconds,
        as_json=args.json,
        devices=args.devices,
        rate=args.rate,
        workdir=args.workdir,
        export_dir=args.export,
        rotate=args.rotate,
    )


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:7443", help="gateway API host:port")
    p.add_argument("--ca-file", type=Path, help="CA bundle for the gateway's TLS certificate")
    p.add_argument("--cert-file", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--key-file", type=Path, help="client key (mutual TLS)")
    p.add_argument("--plaintext", action="store_true", help="no TLS (only for loopback)")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors exiting 64 (EX_USAGE, as documented), not 2. Sub-command
    parsers are made of the same class. `lazy_arguments` adds a sub-command's arguments
    only when that sub-command is chosen, so that `run` never loads the lab's modules."""

    def __init__(
        self,
        *args: Any,
        lazy_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._lazy_arguments = lazy_arguments

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._lazy_arguments is not None:
            add, self._lazy_arguments = self._lazy_arguments, None
            add(self)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="edge-gateway", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"edge-gateway {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="run the gateway service")
    p.add_argument("--config", type=Path, default=DEFAULT_PATH)
    p.set_defaults(fn=_cmd_run)

    p = sub.add_parser("hsm", help="the signing key in the HSM")
    hsub = p.add_subparsers(dest="hsm_cmd", required=True)
    for name, text in (
        ("init", "create the P-256 signing key (kept if it exists)"),
        ("info", "show token, key and key_id"),
        ("rotate", "create a new log key; the service rotates to it on reload (SIGHUP)"),
    ):
        hp = hsub.add_parser(name, help=text)
        hp.add_argument("--config", type=Path, default=DEFAULT_PATH)
        hp.add_argument("--pem-out", type=Path, help="also write the public key PEM here")
        hp.add_argument(
            "--user", help="use the token as this user (default: edge-gateway when run as root)"
        )
        hp.set_defaults(fn=_cmd_hsm)

    from gateway.edge import provision

    p = sub.add_parser("setup", help="first-run provisioning: profiles, keys, PIN, token, key")
    provision.add_setup_arguments(p)
    p = sub.add_parser("config", help="write a configuration, or check one without starting")
    provision.add_config_arguments(p)
    p = sub.add_parser("device", help="device keys for authenticating profiles")
    provision.add_device_arguments(p)

    p = sub.add_parser("broker", help="the MQTT broker's configuration for this gateway")
    from gateway.edge.broker import add_arguments as add_broker_arguments

    add_broker_arguments(p)

    p = sub.add_parser("ledger-node", help="run the reference ledger node, or make its key")
    p.add_argument("--config", type=Path, help="the node's configuration, to run it")
    p.set_defaults(fn=_cmd_ledger)
    node_sub = p.add_subparsers(dest="ledger_cmd", required=False)
    k = node_sub.add_parser(
        "keygen", help="write a new Ed25519 witness key (mode 0600) and print its vkey"
    )
    k.add_argument(
        "--name", required=True, help="the witness name, <domain>/ledger-witness/<node id>"
    )
    k.add_argument("--out", type=Path, required=True, help="the key file to create")
    k.set_defaults(fn=_cmd_ledger_keygen)

    p = sub.add_parser("status", help="the gateway's status as a table")
    _client_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(fn=_cmd_status)

    p = sub.add_parser("proof", help="fetch a transaction's proof and verify it offline")
    p.add_argument("tx_id")
    p.add_argument("--public-key", type=Path, required=True, help="the gateway's public key PEM")
    p.add_argument(
        "--origin",
        help="the log's origin (default: the one the checkpoint names, checked "
        "against the gateway's key)",
    )
    p.add_argument(
        "--witness",
        action="append",
        metavar="VKEY",
        help="a witness's cosignature vkey (repeat for each ledger node)",
    )
    p.add_argument(
        "--witnesses-file", type=Path, help="a file of witness vkeys, one a line ('#' comments)"
    )
    p.add_argument(
        "--witness-quorum",
        type=int,
        metavar="M",
        help="witnesses that must have cosigned (default: a majority of those given)",
    )
    _client_args(p)
    p.set_defaults(fn=_cmd_proof)

    p = sub.add_parser(
        "export", help="write the log's export for auditors from the spool (read-only)"
    )
    p.add_argument("--config", type=Path, default=DEFAULT_PATH)
    p.add_argument("--out", type=Path, required=True, help="the directory to write (empty)")
    p.add_argument(
        "--sample",
        type=int,
        default=100,
        metavar="N",
        help="transactions with an inclusion proof, spread over the log (default 100)",
    )
    p.add_argument(
        "--since",
        type=int,
        default=0,
        metavar="SIZE",
        help="leave out committed checkpoints of trees smaller than SIZE",
    )
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    p.add_argument(
        "--public-key",
        action="append",
        type=Path,
        metavar="PEM",
        help="the log's public key (repeat during a key rotation; default: read from the HSM)",
    )
    p.add_argument(
        "--witness",
        action="append",
        metavar="VKEY",
        help="a witness vkey beside those of [log] witnesses (repeat for each)",
    )
    p.add_argument(
        "--user", help="read the HSM as this user (default: edge-gateway when run as root)"
    )
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser(
        "simulate",
        help="publish device traffic over MQTT",
        lazy_arguments=_simulate_arguments,
    )
    p.set_defaults(fn=_cmd_simulate)

    p = sub.add_parser("profiles", help="firmware profiles: list, check a file, decode a payload")
    from gateway.edge.profiles.tool import add_arguments as add_profiles_arguments

    add_profiles_arguments(p)
    p.set_defaults(fn=_cmd_profiles)

    p = sub.add_parser("pki", help="TLS certificates for a lab")
    psub = p.add_subparsers(dest="pki_cmd", required=True)
    pp = psub.add_parser(
        "dev",
        help="a throwaway CA with server and client certificates (never for production)",
    )
    pp.add_argument("--out", type=Path, required=True, help="directory to write into")
    pp.add_argument(
        "--hosts",
        default="127.0.0.1,localhost,::1",
        help="comma-separated names and addresses the server certificates carry",
    )
    pp.add_argument("--days", type=int, default=90, help="validity in days (default 90)")
    pp.add_argument("--force", action="store_true", help="replace a dev PKI already in --out")
    pp.add_argument("--group", help="let this group read the leaf keys (0640; needs root)")
    pp.set_defaults(fn=_cmd_pki)

    p = sub.add_parser("demo", help="the whole pipeline on this machine, then a summary")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--devices", type=int, default=300)
    p.add_argument("--rate", type=float, default=1500.0, help="messages per second in all")
    p.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    p.add_argument("--workdir", type=Path, help="keep the demo's files here")
    p.add_argument(
        "--export",
        type=Path,
        metavar="DIR",
        help="after the run, write the export for auditors to DIR (empty) and verify it",
    )
    p.add_argument(
        "--no-rotate",
        dest="rotate",
        action="store_false",
        help="keep the log key (by default it is rotated a third of the way: hsm rotate + SIGHUP)",
    )
    p.set_defaults(fn=_cmd_demo)
    return ap


def _quiet_grpc_core() -> None:
    """gRPC's C core writes log lines of its own straight to stderr (absl's "WARNING: All
    log messages before absl::InitializeLog() ...", "E0000 ... bind failed"), around the
    one line the gateway prints. It reads GRPC_VERBOSITY once, when grpc is first
    imported; this module imports grpc only inside the commands, after this ran. An
    operator's own GRPC_VERBOSITY (and GRPC_TRACE, never set here) is kept."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def _os_error(cmd: str, e: OSError) -> tuple[str, int]:
    """An OSError that reached the top: one line naming what failed, and its exit code."""
    names = [str(f) for f in (e.filename, e.filename2) if f is not None]
    what = (" -> ".join(names) + ": ") if names else ""
    why = e.strerror or str(e) or type(e).__name__
    if isinstance(e, PermissionError):
        fix = "fix its owner or mode, or run as a user who may use it"
        return f"{cmd}: {what}{why}: {fix}", EXIT_NOPERM
    if isinstance(e, ConnectionError | TimeoutError | socket.gaierror):
        return f"{cmd}: {what}{why}", EXIT_UNAVAILABLE
    return f"{cmd}: {what}{why}", EXIT_IOERR


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_grpc_core()
    ap = parser()
    args = ap.parse_args(argv)
    try:
        code: int = args.fn(args)
        return code
    except GatewayError as e:
        # One line, always: a message quoting a library's report may hold newlines.
        one_line = " ".join(str(e).splitlines())
        print(f"edge-gateway: {one_line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_USAGE
    except OSError as e:
        line, code = _os_error(args.cmd, e)
        print(f"edge-gateway: {line}", file=sys.stderr)
        return code
    except Exception:  # a bug: its traceback is for the report, and 70 says so
        traceback.print_exc()
        return EXIT_SOFTWARE


if __name__ == "__main__":
    sys.exit(main())
