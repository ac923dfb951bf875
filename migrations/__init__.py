"""Alembic environment and revisions for the MindHarbor database."""
