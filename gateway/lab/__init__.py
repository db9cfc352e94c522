"""The lab: sandbox, demo, simulator, load generator, benchmarks and the development PKI.

Tools for developers, tests and evaluation; an operator's box never runs them. Modules here
may import every other room (they start the edge service and ledger nodes to exercise
them); nothing outside the lab imports them, except gateway.cli inside the subcommands
that run them.
"""
