"""Keys expire; query usage counted per (key, model), (owner, model) and model.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        # Usage is counted per model now (query_usage); a key-wide total counted the wrong thing.
        batch.drop_column("queries_used")
        batch.create_index("ix_api_keys_revoked_at", ["revoked_at"])
    op.create_table(
        "query_usage",
        sa.Column("scope", sa.String(8), primary_key=True),
        sa.Column("subject_id", sa.Uuid(), primary_key=True),
        sa.Column("model_id", sa.Uuid(), primary_key=True),
        sa.Column("used", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("query_usage")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_index("ix_api_keys_revoked_at")
        batch.drop_column("expires_at")
        batch.add_column(sa.Column("queries_used", sa.Integer(), nullable=False, server_default="0"))
