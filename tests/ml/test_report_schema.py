"""The report's JSON Schema in docs/ is the one the typed result generates, stored reports validate
against it, and a stored report reads back into the type and serialises to the same JSON."""

import json
from pathlib import Path

import jsonschema

from ml.audit import AuditReport, report_findings, report_schema

ROOT = Path(__file__).parents[2]
SEEDED = ROOT / "tests" / "service" / "seeded_report.json"


def test_the_committed_schema_is_the_generated_one() -> None:
    committed = json.loads((ROOT / "docs" / "report-schema.json").read_text())
    assert committed == json.loads(json.dumps(report_schema())), (
        "docs/report-schema.json is stale: regenerate it (docs/report-schema.md says how)"
    )


def test_a_stored_report_validates_and_round_trips() -> None:
    stored = json.loads(SEEDED.read_text())
    jsonschema.validate(stored, report_schema())
    report = AuditReport.model_validate(stored)
    assert report.to_json() == stored  # the same keys, the same values: the type is the JSON
    assert report.findings is not None and report.findings.verdict == report.verdict
    assert report.job_headline().safe_budget == min(stored["safe_budget"]["teacher"].values())


def test_reports_of_earlier_versions_are_read() -> None:
    """No findings, no statement, no timing, fields since renamed or added: read, kept, written back."""
    old = {
        "version": 0,
        "config": {"epochs": 10, "seeds": 1},
        "teacher": {"accuracy": 90.0, "serving": {"policy": {}}},
        "students": {"mlp": {"ls": {}, "attacks": {}, "verdict": "inconclusive", "legacy": 1}},
        "verdict": "inconclusive",
        "a_section_from_elsewhere": {"kept": True},
    }
    report = AuditReport.model_validate(old)
    assert report.to_json() == old
    assert report.findings is None and report.control is None and report.served_safe_budget() is None
    assert report_findings(report).verdict == "inconclusive"  # the findings of a report stored without
