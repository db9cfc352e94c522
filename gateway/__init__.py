"""Edge ledger gateway: device transactions in, signed hash-chained batches out.

The package has five rooms; each `__init__` says what lives there and what may import it:

- gateway.formats: wire and log formats (batches, canonical transactions, Merkle trees,
  signed notes, checkpoints, cosignatures, proof bundles, tiles). Pure; imports no other room.
- gateway.common: plumbing both programs use (errors, logs, TOML reading, TLS checks,
  certificate identities, gRPC helpers, sd_notify, shipped resources).
- gateway.edge: the edge service an operator's box runs (intake, spool, batcher, signer,
  forwarder, API, metrics, provisioning, firmware profiles).
- gateway.ledger: the reference ledger node, which runs on other machines.
- gateway.lab: the sandbox, demo, simulator, load generator, benchmarks and development PKI,
  which an operator's box never runs.

gateway.cli is the front door: it imports the edge service, and the ledger node and the lab
only inside the subcommands that run them. tests/test_import_boundaries.py enforces the lines.
"""

__version__ = "0.1.0"
