"""Persistence: typed ORM models, Alembic migrations and a small repository layer."""
