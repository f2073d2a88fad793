"""What an audit task hands to the assembly: typed records, stored as JSON (an artifact under the task's
key). Results stored before the records were typed (positional lists) are read as well."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

_FLOATS_AS_GIVEN = ConfigDict(ser_json_inf_nan="constants")  # a student without fidelity stores NaN


def _positional(fields: tuple[str, ...], optional: int = 0) -> Any:
    """A before-validator reading the positional list an earlier version stored (the last `optional`
    fields may be missing)."""

    def read(cls: type[BaseModel], value: Any) -> Any:
        if not isinstance(value, list | tuple):
            return value
        if not len(fields) - optional <= len(value) <= len(fields):
            raise ValueError(f"expected {len(fields)} positional fields, got {len(value)}")
        return dict(zip(fields, value, strict=False))

    return model_validator(mode="before")(classmethod(read))  # type: ignore[arg-type]


class StudentRecord(BaseModel):
    """One trained student of one task: which row it is, and what it reached."""

    model_config = _FLOATS_AS_GIVEN

    phase: int | None  # None: the unlimited phase; B: the attackers holding B answers
    teacher: str | None  # the black box it attacked (None: an LS student)
    arch: str
    row: str
    best: float  # best test accuracy over its epochs
    last: float
    fidelity: float  # agreement with its teacher (NaN for LS students)
    queries: int

    _read_list = _positional(("phase", "teacher", "arch", "row", "best", "last", "fidelity", "queries"))

    @property
    def key(self) -> tuple[int | None, str | None, str, str]:
        return self.phase, self.teacher, self.arch, self.row


class EvidenceRecord(BaseModel):
    """One trained student's agreement with one black box's evidence challenge (`ml.evidence.audit`)."""

    phase: int | None
    teacher: str | None
    arch: str
    row: str
    mechanism: str
    box: str
    agreement: float
    agrees: str | None = None  # a selecting mechanism's pool: agreement per candidate, packed bits as hex

    _read_list = _positional(
        ("phase", "teacher", "arch", "row", "mechanism", "box", "agreement", "agrees"), 1
    )

    def as_tuple(self) -> tuple[Any, ...]:
        """The form `ml.evidence.audit.evidence_section` reads."""
        return (self.phase, self.teacher, self.arch, self.row, self.mechanism, self.box, self.agreement,
                self.agrees)  # fmt: skip


class TaskResult(BaseModel):
    """One task's result: its students' records, their evidence agreements and the seconds it took."""

    model_config = _FLOATS_AS_GIVEN

    key: str
    seed_index: int
    phase: int | None
    records: list[StudentRecord]
    nulls: bool = False  # the null's independent models of other architectures (phase None)
    seconds: float | None = None
    evidence: list[EvidenceRecord] = Field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
