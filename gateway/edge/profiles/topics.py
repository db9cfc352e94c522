"""MQTT topic filters (MQTT 5 section 4.7): matching and which filter wins.

A topic can match filters of several profiles ("meters/+/up" and
"meters/#"); the most specific one wins, level by level: a literal level beats
'+', which beats '#'. Two profiles cannot claim the same filter (refused at
load), so the winner is always unique.
"""

from __future__ import annotations


def matches(levels: tuple[str, ...], topic: list[str]) -> bool:
    """Whether a topic (split on '/') matches a filter (split on '/')."""
    # Wildcards at the first level do not match topics starting with '$' (4.7.2).
    if topic and topic[0].startswith("$") and levels and levels[0] in ("+", "#"):
        return False
    n = len(levels)
    for i, lv in enumerate(levels):
        if lv == "#":
            return True
        if i >= len(topic):
            return False
        if lv != "+" and lv != topic[i]:
            return False
    return n == len(topic)


def specificity(levels: tuple[str, ...]) -> tuple[int, ...]:
    """Sort key: higher is more specific."""
    return tuple(0 if lv == "#" else 1 if lv == "+" else 2 for lv in levels)


def example_topic(topic_filter: str, device_level: int | None, device_id: str) -> str:
    """A concrete topic of `topic_filter` with `device_id` at its device level."""
    out = []
    for i, lv in enumerate(topic_filter.split("/")):
        if i == device_level:
            out.append(device_id)
        elif lv == "+":
            out.append("x")
        elif lv == "#":
            out.append("data")
        else:
            out.append(lv)
    return "/".join(out)
