"""Plumbing both programs use: exit codes and errors, logfmt logs, TOML reading and TLS
settings, certificate checks and identities, gRPC helpers, sd_notify, shipped resources.

Modules here import only gateway.formats and each other; every room may import them.
"""
