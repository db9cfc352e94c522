"""Where the files that ship beside the code are: firmware profiles, examples, units...

Installed from the wheel (or the Debian package) they are copies in gateway/_share/<name>;
in a checkout or an editable install they are the repository's top-level directories. Code
asks here instead of walking up from its own file, so both layouts work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

Resource = Literal["firmware_profiles", "examples", "systemd", "dashboards", "alerts", "protos"]
NAMES: Final[tuple[Resource, ...]] = (
    "firmware_profiles",
    "examples",
    "systemd",
    "dashboards",
    "alerts",
    "protos",
)

_PACKAGE = Path(__file__).resolve().parents[1]  # gateway/
SHARE: Final[Path] = _PACKAGE / "_share"


def path(name: Resource) -> Path:
    """The directory `name`: the installed copy if there is one, else the checkout's.

    When neither exists the installed location is returned, so that whoever opens it
    names the place a complete install would have it.
    """
    if name not in NAMES:
        raise ValueError(f"unknown resource directory {name!r}: one of {', '.join(NAMES)}")
    shipped = SHARE / name
    if shipped.is_dir():
        return shipped
    checkout = _PACKAGE.parent / name
    if checkout.is_dir():
        return checkout
    return shipped


def profiles_dir() -> Path:
    """The shipped firmware profiles (with samples/ and their keys)."""
    return path("firmware_profiles")


def examples_dir() -> Path:
    """Example gateway and ledger node configurations."""
    return path("examples")


def systemd_dir() -> Path:
    """The systemd units."""
    return path("systemd")


def dashboards_dir() -> Path:
    """Grafana dashboards for the gateway's metrics."""
    return path("dashboards")


def alerts_dir() -> Path:
    """Prometheus alerting rules for the gateway's metrics."""
    return path("alerts")


def protos_dir() -> Path:
    """The .proto sources of the batch format and the gRPC APIs."""
    return path("protos")
