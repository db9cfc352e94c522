"""The one list of rejection reason codes.

Every Rejected the decoders raise carries one of these; ingest counts them per
reason and puts them on the dead-letter topic. firmware_profiles/README.md
says when each one is raised; `poison` is intake's own (gateway.edge.poison): a
message that made intake fail twice.
"""

from __future__ import annotations

REASONS = (
    "too_large",
    "not_decodable",
    "bad_encoding",
    "missing_field",
    "wrong_type",
    "out_of_range",
    "unknown_topic",
    "unknown_profile",
    "bad_device_id",
    "bad_device_auth",
    "replay",
    "conflicting_duplicate",
    "rate_limited",
    "clock_skew",
    "poison",
)
