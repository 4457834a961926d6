"""Safety policies as the operator names them in GATEWAY_SAFETY_POLICIES (a JSON object, name -> properties), parsed
and validated once at start-up. Pure: no I/O, nothing imported from the request flow.

    shield_prompt   Prompt Shields on the user prompt and the documents (tool results, retrieved text): jailbreaks and
                    injected instructions (default true)
    categories      {"Hate"|"SelfHarm"|"Sexual"|"Violence": severity} blocks from that severity (0-7; the service
                    answers 0, 2, 4 or 6 by default)
    blocklists      names of Content Safety blocklists: a match blocks
    pii             "off" | "redact" | "block", or {"mode": ..., "categories": [...]} (Language's PII categories;
                    none named: every category the service detects)
    on_unavailable  "closed" (503 with Retry-After while the service cannot be asked) | "open" (forwarded, counted)
    audit           "off" | "on" (prompt and completion to Blob Storage, best effort) | "required" (refused with 503
                    while the trail cannot take the record)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

CATEGORIES = ("Hate", "SelfHarm", "Sexual", "Violence")
PII_MODES = ("off", "redact", "block")
AUDIT_MODES = ("off", "on", "required")
UNAVAILABLE_MODES = ("closed", "open")
NONE = "none"  # on a consumer: no policy, whatever its team's or the gateway's default
POLICY_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_BLOCKLIST = re.compile(r"[A-Za-z0-9_.~-]{1,64}")
_PII_CATEGORY = re.compile(r"[A-Za-z][A-Za-z0-9]{1,63}")
_KNOWN = frozenset({"shield_prompt", "categories", "blocklists", "pii", "on_unavailable", "audit"})


class PolicyError(ValueError):
    """A policy that does not parse; the message names the policy and the property."""


@dataclass(frozen=True, slots=True)
class PiiRule:
    mode: str = "off"
    categories: tuple[str, ...] = ()  # () : every category the service detects


@dataclass(frozen=True, slots=True)
class SafetyPolicy:
    name: str
    shield_prompt: bool = True
    categories: Mapping[str, int] = field(default_factory=dict)  # category -> the severity from which to block
    blocklists: tuple[str, ...] = ()
    pii: PiiRule = PiiRule()
    on_unavailable: str = "closed"
    audit: str = "off"

    @property
    def analyze(self) -> bool:
        """Whether text:analyze is called (harm categories or blocklists)."""
        return bool(self.categories) or bool(self.blocklists)

    @property
    def content_safety(self) -> bool:
        return self.shield_prompt or self.analyze

    @property
    def audited(self) -> bool:
        return self.audit != "off"


def valid_name(name: str) -> bool:
    return bool(POLICY_NAME.fullmatch(name)) and name != NONE


def parse_policy(name: str, raw: Any) -> SafetyPolicy:
    where = f"policy {name!r}"
    if not valid_name(name):
        raise PolicyError(f"{where}: a name is lower-case letters, digits and '-', at most 63, and not {NONE!r}")
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a JSON object of properties")
    unknown = sorted(set(raw) - _KNOWN)
    if unknown:
        raise PolicyError(f"{where}: unknown properties {', '.join(unknown)} (known: {', '.join(sorted(_KNOWN))})")
    shield = raw.get("shield_prompt", True)
    if not isinstance(shield, bool):
        raise PolicyError(f"{where}: shield_prompt: expected true or false")
    categories = raw.get("categories", {})
    if not isinstance(categories, dict):
        raise PolicyError(f"{where}: categories: expected an object {{category: severity}}")
    for category, severity in categories.items():
        if category not in CATEGORIES:
            raise PolicyError(f"{where}: categories: {category!r} is not one of {', '.join(CATEGORIES)}")
        if isinstance(severity, bool) or not isinstance(severity, int) or not 0 <= severity <= 7:
            raise PolicyError(f"{where}: categories: {category}: expected a severity 0 to 7, got {severity!r}")
    blocklists = raw.get("blocklists", [])
    if not isinstance(blocklists, list) or not all(isinstance(b, str) and _BLOCKLIST.fullmatch(b) for b in blocklists):
        raise PolicyError(f"{where}: blocklists: expected a list of blocklist names (letters, digits, _.~-, <= 64)")
    if len(blocklists) > 10:
        raise PolicyError(f"{where}: blocklists: at most 10")
    pii = _pii(where, raw.get("pii", "off"))
    on_unavailable = raw.get("on_unavailable", "closed")
    if on_unavailable not in UNAVAILABLE_MODES:
        raise PolicyError(f"{where}: on_unavailable: expected closed or open, got {on_unavailable!r}")
    audit = raw.get("audit", "off")
    if audit is False:
        audit = "off"
    if audit is True:
        audit = "on"
    if audit not in AUDIT_MODES:
        raise PolicyError(f"{where}: audit: expected off, on or required, got {audit!r}")
    policy = SafetyPolicy(name, shield, dict(categories), tuple(blocklists), pii, on_unavailable, audit)
    if not policy.content_safety and pii.mode == "off" and not policy.audited:
        raise PolicyError(f"{where}: checks nothing (shield_prompt false, no categories, blocklists, pii or audit)")
    return policy


def _pii(where: str, raw: Any) -> PiiRule:
    if isinstance(raw, str):
        raw = {"mode": raw}
    if not isinstance(raw, dict) or set(raw) - {"mode", "categories"}:
        raise PolicyError(f"{where}: pii: expected off, redact, block or {{\"mode\": ..., \"categories\": [...]}}")
    mode = raw.get("mode", "redact")
    if mode not in PII_MODES:
        raise PolicyError(f"{where}: pii: mode: expected off, redact or block, got {mode!r}")
    categories = raw.get("categories", [])
    if not isinstance(categories, list) or not all(isinstance(c, str) and _PII_CATEGORY.fullmatch(c) for c in categories):
        raise PolicyError(f"{where}: pii: categories: expected a list of Language PII category names, e.g. Email")
    return PiiRule(mode, tuple(categories))


def parse_policies(raw: Any) -> dict[str, SafetyPolicy]:
    if not isinstance(raw, dict):
        raise PolicyError("expected a JSON object {policy name: properties}")
    return {name: parse_policy(name, props) for name, props in raw.items()}


def resolve(own: str | None, team: str | None, default: str | None) -> str | None:
    """The policy that applies: the consumer's own, else its team's, else the gateway's default; `none` on the
    consumer (or its team) stops the search there."""
    for name in (own, team, default):
        if name:
            return None if name == NONE else name
    return None
