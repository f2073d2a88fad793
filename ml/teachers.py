"""Teacher and CE-control set-up shared by the service's jobs, `cmim audit` and `cmim bench paper`.

The CE control is the teacher's recipe trained with plain cross-entropy (optionally another zoo
architecture): the model an audit must find copyable for its verdict to mean anything.
"""

from __future__ import annotations

from typing import Any

from ml.train import TrainConfig

CONTROL_OBJECTIVE = "ce"


def control_recipe(
    teacher: TrainConfig, arch: str | None = None, *, from_scratch: bool = False
) -> TrainConfig:
    """The CE control's training config: the teacher's recipe with plain CE, on `arch` (default the
    teacher's). `from_scratch`: the teacher was not trained by this recipe (an uploaded model), so the
    control trains at the default rate without warm-up."""
    update: dict[str, Any] = {
        "objective": CONTROL_OBJECTIVE,
        "objective_params": {},
        "arch": arch or teacher.arch,
    }
    if from_scratch:
        update |= {"lr": TrainConfig().lr, "warmup_epochs": 0.0}
    return teacher.model_copy(update=update)
