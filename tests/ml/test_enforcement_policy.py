"""Enforcement's rules: an alert's action on a key, escalation only, and what a standing does to the
key's rate limit and budget."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from ml.enforcement import EnforcementPolicy, Standing, StandingBook, escalate

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_default_policy_suspends_on_either_alert() -> None:
    policy = EnforcementPolicy()
    assert policy.action("key") == policy.action("model") == "suspend"
    assert policy.owner_query_budget is None
    custom = EnforcementPolicy(on_key_alert="notify", on_model_alert="throttle")
    assert (custom.action("key"), custom.action("model")) == ("notify", "throttle")
    for bad in ({"on_key_alert": "ban"}, {"throttle_fraction": 1.0}, {"probation_queries": -1}, {"x": 1}):
        with pytest.raises(ValidationError):
            EnforcementPolicy.model_validate(bad)


def test_throttle_cuts_the_rate_and_probation_the_budget() -> None:
    policy = EnforcementPolicy(throttle_fraction=0.25, probation_queries=50)
    throttled = escalate(None, "throttle", policy, 900, "a1", NOW)
    assert throttled is not None and throttled.state == "throttled" and throttled.alert_id == "a1"
    assert throttled.rate(600) == 150 and throttled.rate(3) == 1  # never below one request a minute
    assert throttled.limit(4000) == 4000 and throttled.limit(None) is None
    probation = escalate(None, "probation", policy, 900, "a1", NOW)
    assert probation is not None and probation.budget_limit == 950
    assert probation.limit(4000) == 950 and probation.limit(None) == 950 and probation.limit(10) == 10
    assert probation.rate(600) == 600


def test_actions_only_escalate_and_keep_what_weaker_ones_set() -> None:
    policy = EnforcementPolicy(probation_queries=10)
    throttled = escalate(None, "throttle", policy, 100, "a1", NOW)
    both = escalate(throttled, "probation", policy, 120, "a2", NOW)
    assert both is not None and both.state == "probation" and both.alert_id == "a2"
    assert both.rate_fraction == policy.throttle_fraction and both.budget_limit == 130
    suspended = escalate(both, "suspend", policy, 125, "a3", NOW)
    assert suspended is not None and suspended.suspended and suspended.budget_limit == 130
    # no weaker or equal action changes a standing; notify never does
    assert escalate(suspended, "throttle", policy, 130, "a4", NOW) is None
    assert escalate(suspended, "suspend", policy, 130, "a4", NOW) is None
    assert escalate(None, "notify", policy, 0, "a4", NOW) is None


def test_a_standing_book_holds_and_reinstates() -> None:
    book = StandingBook()
    standing = Standing("suspended", "a1", NOW)
    book.put("m", "k", standing)
    assert book.get("m", "k") == standing and book.get("m", "other") is None and len(book) == 1
    book.put("m", "k", None)
    assert book.get("m", "k") is None and len(book) == 0
