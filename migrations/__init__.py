"""Alembic migrations of the shared schema (``tenancy.models``); see ``migrations.runner``."""
