"""Fuzzing the running gateway: `make fuzz` (large), `make test` (small)."""
