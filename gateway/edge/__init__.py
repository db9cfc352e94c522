"""The edge service: what runs on an operator's box as edge-gateway.service.

MQTT and gRPC intake, firmware-profile decoding, the durable spool, batching and signing in
the HSM, forwarding to ledger nodes, the gateway API, metrics, provisioning and broker
configuration. Modules here import gateway.formats, gateway.common and each other; never
gateway.ledger or gateway.lab. gateway.lab and gateway.cli may import them.
"""
