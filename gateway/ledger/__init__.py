"""The reference ledger node: witnesses gateways' logs and keeps the leaves it cosigned.

It runs on other machines (edge-ledger-node@.service) with its own configuration, and
shares only gateway.formats and gateway.common with the edge service: modules here never
import gateway.edge or gateway.lab. gateway.lab and gateway.cli may import them.
"""
