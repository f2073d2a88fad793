"""Enforcement on served models (policies, key standings, the append-only action log) and owner webhooks
with their delivery log.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-12
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _when(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "enforcement_policies",
        sa.Column("model_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        _when("updated_at"),
    )
    op.create_index("ix_enforcement_policies_updated_at", "enforcement_policies", ["updated_at"])
    op.create_table(
        "key_standings",
        sa.Column("model_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("key_id", sa.Uuid(), sa.ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("alert_id", sa.Uuid(), nullable=True),
        sa.Column("rate_fraction", sa.Float(), nullable=True),
        sa.Column("budget_limit", sa.BigInteger(), nullable=True),
        _when("since"),
        _when("reviewed_at", nullable=True),
        _when("updated_at"),
    )
    op.create_index("ix_key_standings_state", "key_standings", ["state"])
    op.create_index("ix_key_standings_updated_at", "key_standings", ["updated_at"])
    op.create_table(
        "enforcement_actions",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("model_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("key_id", sa.Uuid(), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("alert_id", sa.Uuid(), nullable=True),
        sa.Column("actor", sa.String(8), nullable=False),
        sa.Column("actor_key_id", sa.Uuid(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        _when("created_at"),
    )
    op.create_index(
        "ix_enforcement_actions_model_created", "enforcement_actions", ["model_id", "created_at", "id"]
    )
    op.create_table(
        "webhooks",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("url", sa.String(2000), nullable=False),
        sa.Column("secret", sa.String(100), nullable=False),
        sa.Column("description", sa.String(200), nullable=False),
        _when("created_at"),
        _when("deleted_at", nullable=True),
    )
    op.create_index("ix_webhooks_owner_created", "webhooks", ["owner_id", "created_at", "id"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("webhook_id", sa.Uuid(), sa.ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("owner_id", sa.Uuid(), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("log", sa.JSON(), nullable=False),
        _when("next_attempt_at", nullable=True),
        _when("created_at"),
        _when("delivered_at", nullable=True),
    )
    op.create_index(
        "ix_webhook_deliveries_hook_created", "webhook_deliveries", ["webhook_id", "created_at", "id"]
    )
    op.create_index("ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("webhooks")
    op.drop_table("enforcement_actions")
    op.drop_table("key_standings")
    op.drop_table("enforcement_policies")
