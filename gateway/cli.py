"""`edge-gateway`: the operator's command line.

Expected failures print one line naming the thing, the value and the fix, and
exit with a documented code (gateway.errors); tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.config import DEFAULT_PATH, load_gateway_config, load_ledger_config
from gateway.errors import EXIT_USAGE, GatewayError


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway import logs, service

    cfg = load_gateway_config(args.config)
    logs.configure(cfg.log_level)
    return service.run(cfg)


def _cmd_hsm(args: argparse.Namespace) -> int:
    from gateway import signer

    cfg = load_gateway_config(args.config)
    pin = cfg.hsm.pin.read()
    info = (
        signer.init_key(cfg.hsm, pin) if args.hsm_cmd == "init" else signer.key_info(cfg.hsm, pin)
    )
    print(f"token:       {info.token_label} (serial {info.token_serial}, {info.token_model})")
    print(f"key:         label {info.key_label!r}, CKA_ID {info.cka_id.hex()}")
    print(f"sensitive:   {info.sensitive}   extractable: {info.extractable}")
    print(f"key_id:      {info.key_id.hex()}")
    print(info.public_pem.decode("ascii"), end="")
    if args.pem_out:
        args.pem_out.write_bytes(info.public_pem)
        print(f"public key written to {args.pem_out}")
    return 0


def _cmd_ledger(args: argparse.Namespace) -> int:
    from gateway import ledger, logs

    cfg = load_ledger_config(args.config)
    logs.configure("info")
    return ledger.run(cfg)


def _cmd_status(args: argparse.Namespace) -> int:
    from gateway import client

    return asyncio.run(client.print_status(client.ClientOptions.from_args(args)))


def _cmd_proof(args: argparse.Namespace) -> int:
    from gateway import client

    return asyncio.run(
        client.check_proof(client.ClientOptions.from_args(args), args.tx_id, args.public_key)
    )


def _cmd_simulate(args: argparse.Namespace) -> int:
    from gateway import simulate

    result = asyncio.run(simulate.run(simulate.SimulateOptions.from_args(args)))
    print(result.line())
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    code: int = args.profiles_fn(args)
    return code


def _cmd_pki(args: argparse.Namespace) -> int:
    from gateway import pki

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    made = pki.make_dev_pki(args.out, hosts, args.days, force=args.force)
    print("\n".join(pki.describe(made, hosts)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway import demo

    return demo.main(
        seconds=args.seconds,
        as_json=args.json,
        devices=args.devices,
        rate=args.rate,
        workdir=args.workdir,
    )


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:7443", help="gateway API host:port")
    p.add_argument("--ca-file", type=Path, help="CA bundle for the gateway's TLS certificate")
    p.add_argument("--cert-file", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--key-file", type=Path, help="client key (mutual TLS)")
    p.add_argument("--plaintext", action="store_true", help="no TLS (only for loopback)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="edge-gateway", description=__doc__.splitlines()[0])
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
    ):
        hp = hsub.add_parser(name, help=text)
        hp.add_argument("--config", type=Path, default=DEFAULT_PATH)
        hp.add_argument("--pem-out", type=Path, help="also write the public key PEM here")
        hp.set_defaults(fn=_cmd_hsm)

    p = sub.add_parser("ledger-node", help="run the reference ledger node")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(fn=_cmd_ledger)

    p = sub.add_parser("status", help="the gateway's status as a table")
    _client_args(p)
    p.set_defaults(fn=_cmd_status)

    p = sub.add_parser("proof", help="fetch a transaction's proof and verify it offline")
    p.add_argument("tx_id")
    p.add_argument("--public-key", type=Path, required=True, help="the gateway's public key PEM")
    _client_args(p)
    p.set_defaults(fn=_cmd_proof)

    p = sub.add_parser("simulate", help="publish device traffic over MQTT")
    from gateway.simulate import add_arguments

    add_arguments(p)
    p.set_defaults(fn=_cmd_simulate)

    p = sub.add_parser("profiles", help="firmware profiles: list, check a file, decode a payload")
    from gateway.profiles.tool import add_arguments as add_profiles_arguments

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
    pp.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    pp.add_argument("--force", action="store_true", help="replace a dev PKI already in --out")
    pp.set_defaults(fn=_cmd_pki)

    p = sub.add_parser("demo", help="the whole pipeline on this machine, then a summary")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--devices", type=int, default=300)
    p.add_argument("--rate", type=float, default=1500.0, help="messages per second in all")
    p.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    p.add_argument("--workdir", type=Path, help="keep the demo's files here")
    p.set_defaults(fn=_cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    try:
        code: int = args.fn(args)
        return code
    except GatewayError as e:
        print(f"edge-gateway: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
