"""The practice's settings for the client's safety plan and discreet signal: the policy's ``[safety]``.

A client may leave a safety plan in the checklist (a code word meaning "I can't talk freely", and
whether and how to be called back), and during the call can tell the therapist silently that they
cannot talk freely. The practice chooses whether the plan is offered, and where the signal's control
sits in the call and what it says, so that it never looks like an alarm to someone watching the
client's screen (docs/security.md, "The client's device and the person in the room").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

__all__ = ["SIGNAL_PLACES", "SafetySettings", "parse_safety"]

#: Where the signal's control sits in the client's call: an item in the call's menu, a button among
#: the call's controls, or nowhere (then only the code word typed in chat sends the signal).
SIGNAL_PLACES: Final = ("menu", "controls", "none")
_KEYS: Final = frozenset({"plan", "signal_place", "signal_label"})
_MAX_SIGNAL_LABEL: Final = 60


@dataclass(frozen=True)
class SafetySettings:
    """``plan``: the checklist offers the client a safety plan (always optional for the client).
    ``signal_place``, ``signal_label``: where the signal's control sits in the call, and its words."""

    plan: bool = True
    signal_place: str = "menu"
    signal_label: str = "Report a connection problem"

    def for_page(self) -> dict[str, Any]:
        """What the join page needs (``joined.policy.safety``), also part of the policy version."""
        return {"plan": self.plan, "signal_place": self.signal_place, "signal_label": self.signal_label}


def parse_safety(raw: Any, source: str, problems: list[str]) -> SafetySettings:
    """``[safety]``: every key optional; a wrong value is a problem listed, never silently a default."""
    default = SafetySettings()
    if raw is None:
        return default
    if not isinstance(raw, dict):
        problems.append(f"{source}: [safety] must be a table.")
        return default
    for key in sorted(set(raw) - _KEYS):
        problems.append(f"{source}: [safety] has an unknown key {key!r} (expected {', '.join(sorted(_KEYS))}).")
    plan = raw.get("plan", default.plan)
    if not isinstance(plan, bool):
        problems.append(f"{source}: [safety] 'plan' = {plan!r}; it must be true or false.")
        plan = default.plan
    place = raw.get("signal_place", default.signal_place)
    if place not in SIGNAL_PLACES:
        problems.append(f"{source}: [safety] 'signal_place' = {place!r}; use one of {', '.join(SIGNAL_PLACES)}.")
        place = default.signal_place
    label = raw.get("signal_label", default.signal_label)
    if not isinstance(label, str) or not label.strip() or len(label.strip()) > _MAX_SIGNAL_LABEL:
        problems.append(
            f"{source}: [safety] 'signal_label' must be 1 to {_MAX_SIGNAL_LABEL} characters "
            "(the words on the client's control)."
        )
        label = default.signal_label
    elif not label.strip().isprintable():
        problems.append(f"{source}: [safety] 'signal_label' must be printable text on one line.")
        label = default.signal_label
    return SafetySettings(plan=plan, signal_place=str(place), signal_label=label.strip())
