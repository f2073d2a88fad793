"""Alembic migrations: the only way cmim's tables are made."""
