"""The reference ledger node: verifies gateways' signed batches and stores them.

It runs on other machines (edge-ledger-node@.service) with its own configuration, and
shares only gateway.formats and gateway.common with the edge service: modules here never
import gateway.edge or gateway.lab. gateway.lab and gateway.cli may import them.
"""
