"""Formats: what the edge service and the ledger node exchange and store.

Batch encoding, canonical transaction bytes, RFC 9162 Merkle trees and proofs, C2SP signed
notes, checkpoints, cosignatures and tlog-proof bundles, tile layout. Pure functions over
bytes: modules here import only the standard library, cryptography (verification), the
generated protobuf code (gateway._pb) and each other. Every room may import them.
"""
