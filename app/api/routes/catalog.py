"""What a job may name: datasets, architectures, objectives, attacks, key scopes."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from app.core.config import ALL_SCOPES
from app.services.schemas import Catalog
from ml.catalog import OBJECTIVES, attack_infos, dataset_infos, model_infos

router = APIRouter(tags=["catalog"])


@router.get("/catalog", response_model=Catalog, summary="Every name a job request may use")
def catalog() -> Catalog:
    return Catalog(
        datasets=dataset_infos(),
        architectures=[asdict(m) for m in model_infos()],
        objectives=OBJECTIVES.names(),
        attacks=[a._asdict() for a in attack_infos()],
        scopes=list(ALL_SCOPES),
    )
