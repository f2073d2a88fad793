"""The black-box attack suite: one module per knowledge-distillation method, all in one registry."""

from ml.attacks import (  # noqa: F401  (importing registers every attack, in SPEC.md's table order)
    kd,
    hard_label,
    topk,
    dkd,
    dist,
    lskd,
    mlkd,
    ctkd,
    wttm,
    nkd,
    avg,
    mkd,
    skeptical,
    fm,
)
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
