"""The gateway's exceptions: one root, a few meaningful children.

Each operator-facing error carries the process exit code the CLI uses for it,
so systemd's RestartPreventExitStatus can tell "an operator must act" apart
from a crash worth restarting.
"""

from __future__ import annotations

# Exit codes (sysexits.h where one fits). Documented in README.md.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_DEGRADED = 2  # `status`: the gateway answers but is degraded
EXIT_USAGE = 64
EXIT_DATAERR = 65  # spool integrity check failed
EXIT_UNAVAILABLE = 69  # HSM module, token or key not found; broker/ledger unreachable at start
EXIT_SOFTWARE = 70  # a bug (traceback printed), or the intake process died
EXIT_CANTCREAT = 73  # a file a command was asked to write cannot be written
EXIT_IOERR = 74  # spool not writable
EXIT_TEMPFAIL = 75  # another gateway holds the spool; a restart succeeds once it stopped
EXIT_NOPERM = 77  # HSM PIN rejected, PIN file too open
EXIT_CONFIG = 78  # configuration invalid
EXIT_CERTIFICATE = 79  # a TLS certificate, key or CA file missing, expired or mismatched


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""

    exit_code = EXIT_FAILURE


class ConfigError(GatewayError):
    """The configuration cannot be used; the message names key, value and what is allowed."""

    exit_code = EXIT_CONFIG


class CertificateError(ConfigError):
    """A configured TLS file cannot be used: missing, unreadable, unparsable, outside its
    validity window, or a key that does not belong to its certificate. An operator must
    renew or replace it; restarting does not help."""

    exit_code = EXIT_CERTIFICATE


class HsmError(GatewayError):
    """The HSM (module, token, key or session) is not usable."""

    exit_code = EXIT_UNAVAILABLE


class HsmPinError(HsmError):
    """The HSM refused the PIN or the PIN cannot be read safely. Never retried."""

    exit_code = EXIT_NOPERM


class SpoolError(GatewayError):
    """The spool cannot be opened, written or trusted."""

    exit_code = EXIT_IOERR


class SpoolIntegrityError(SpoolError):
    """The spool file failed SQLite's integrity check; it is left untouched."""

    exit_code = EXIT_DATAERR


class SpoolInUse(SpoolError):
    """Another gateway process holds the spool. Two gateways on one spool would sign
    the same seqs: a fork at the ledger. Temporary: systemd's restart succeeds once the
    other one has stopped."""

    exit_code = EXIT_TEMPFAIL


class Unreachable(GatewayError):
    """A broker, ledger node or gateway that a command needs does not answer."""

    exit_code = EXIT_UNAVAILABLE


class OutputFileError(GatewayError):
    """A file a command was asked to write (e.g. `hsm init --pem-out`) cannot be written."""

    exit_code = EXIT_CANTCREAT


class LedgerError(GatewayError):
    """A ledger node refused or could not take a batch."""

    exit_code = EXIT_UNAVAILABLE


class Rejected(GatewayError):
    """A payload is refused. `reason` is one code from gateway.edge.ingest.REASONS."""

    exit_code = EXIT_DATAERR

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
