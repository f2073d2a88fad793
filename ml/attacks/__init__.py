"""The black-box attack suite: one module per knowledge-distillation method, all in one registry."""

import importlib

from ml.attacks.base import (
    ATTACKS,
    Attack,
    AttackContext,
    AttackInfo,
    AttackParams,
    attack_infos,
    build_params,
    make_attack,
    rows,
)

# Importing a module registers its attack; this order (SPEC.md's table) is the registry's order, which
# `cmim attacks`, the API and the default audit follow.
MODULES = (
    "kd", "hard_label", "topk", "dkd", "dist", "lskd", "mlkd",
    "ctkd", "wttm", "nkd", "avg", "mkd", "skeptical", "fm",
)  # fmt: skip
for _name in MODULES:
    importlib.import_module(f"ml.attacks.{_name}")

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "AttackInfo",
    "AttackParams",
    "attack_infos",
    "build_params",
    "make_attack",
    "rows",
]
