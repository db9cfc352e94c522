"""Edge ledger gateway: device transactions in, signed hash-chained batches out."""

__version__ = "0.1.0"
