"""A hostile network: clients with valid certificates.

Every device and client of a carrier holds a certificate from the carrier's CA, and some of
those are compromised. These tests connect to the real gateway API and reference ledger
nodes (grpcio servers from the sandbox, the dev PKI, SoftHSM) with such certificates,
forged to look like someone else's or sending what no honest client sends, and check
that each is refused with the right status while the servers keep serving.
"""
