"""The admission gate: the practice's checklist policy and the broker's own pre-flight, as the hub uses them.

Translates between the wire (protocol structs, stable error codes) and the
checklist and pre-flight modules, and keeps what is stored to plain
JSON-able values: pass/fail per item, the policy version, and the broker's
own pre-flight figures.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from broker.checklist import policy as checklist
from broker.checklist.preflight import PreflightRefused, PreflightResult, PreflightService
from broker.checklist.preflight_slots import SlotLimits
from broker.config import Config
from broker.metrics.labels import PreflightOutcome
from broker.metrics.registry import Metrics
from broker.signaling.protocol import ChecklistSubmit, ErrorCode, ProtocolError

_CODES = {code.value: code for code in ErrorCode}


def _wire_code(code: str, default: ErrorCode) -> ErrorCode:
    return _CODES.get(code, default)


class PolicyChecklist:
    """Verifies checklist submissions against one loaded policy."""

    def __init__(self, policy: checklist.Policy, practice_name: str = "", languages: tuple[str, ...] = ()) -> None:
        self.policy = policy
        self.practice_name = practice_name
        #: The languages the practice offers (BROKER_LANGUAGES); empty: any the page has.
        self.languages = languages

    @classmethod
    def from_config(cls, config: Config) -> PolicyChecklist:
        policy = checklist.load_policy(Path(config.policy_file) if config.policy_file else None)
        return cls(policy, config.practice_name, config.languages)

    def policy_for(self, minor: bool) -> dict[str, Any]:
        """The policy for the page; the practice's name from the configuration unless the policy names it."""
        page = self.policy.for_seat(minor)
        if not page.get("practice_name") and self.practice_name:
            page["practice_name"] = self.practice_name
        if self.languages:
            page["languages"] = list(self.languages)
        return page

    def verify(self, submission: ChecklistSubmit, *, minor: bool, preflight: dict[str, Any] | None) -> dict[str, Any]:
        """The checklist result kept for the seat: with the language the client read the policy in
        (and so accepted its consent in), next to the policy version."""
        if submission.language is not None and self.languages and submission.language not in self.languages:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "The checklist names a language this practice does not offer.")
        try:
            result = checklist.verify(
                self.policy,
                checklist.Submission(
                    submission.policy_version,
                    dict(submission.answers),
                    submission.consent_version,
                    submission.details,
                    submission.answers_sealed,
                    submission.safety_plan,
                ),
                minor=minor,
                preflight=PreflightResult(**preflight) if preflight else None,
            )
        except checklist.ChecklistRejected as exc:
            raise ProtocolError(_wire_code(exc.code, ErrorCode.BAD_MESSAGE), exc.message) from None
        return {**result.summary(), "language": submission.language}


_REFUSALS = {ErrorCode.PREFLIGHT_BUSY: PreflightOutcome.BUSY, ErrorCode.PREFLIGHT_LIMITED: PreflightOutcome.LIMITED}


class BrokerPreflight:
    """The aiortc pre-flight peer, answering in protocol terms."""

    def __init__(self, service: PreflightService) -> None:
        self.service = service
        #: Counts the pre-flights by outcome (set by create_broker).
        self.metrics: Metrics | None = None

    @classmethod
    def from_config(cls, config: Config, ice_servers: list[dict[str, Any]] | None = None) -> BrokerPreflight:
        return cls(PreflightService(limits=SlotLimits.from_config(config), ice_servers=ice_servers or []))

    async def answer(self, offer_sdp: str, session_id: str, peer_id: str) -> tuple[str, str]:
        try:
            return await self.service.answer(offer_sdp, session_id, peer_id)
        except PreflightRefused as exc:
            code = _wire_code(exc.code, ErrorCode.PREFLIGHT_REFUSED)
            if code not in (ErrorCode.PREFLIGHT_BUSY, ErrorCode.PREFLIGHT_LIMITED):
                code = ErrorCode.PREFLIGHT_REFUSED
            retry = None if exc.retry_after_s is None else max(1, math.ceil(exc.retry_after_s * 1000))
            self._count(_REFUSALS.get(code, PreflightOutcome.REFUSED))
            raise ProtocolError(code, exc.message, retry_after_ms=retry) from None

    async def wait_result(self, preflight_id: str, timeout: float) -> dict[str, Any]:
        try:
            result = await self.service.wait_result(preflight_id, timeout)
        except PreflightRefused:
            self._count(PreflightOutcome.FAILED)
            return dataclasses.asdict(PreflightResult(False, None, False, 0.0))
        except TimeoutError:
            self._count(PreflightOutcome.FAILED)
            raise
        self._count(PreflightOutcome.CONNECTED if result.connected else PreflightOutcome.FAILED)
        return dataclasses.asdict(result)

    def _count(self, outcome: PreflightOutcome) -> None:
        if self.metrics is not None:
            self.metrics.preflight(outcome)

    async def close(self) -> None:
        await self.service.close()
