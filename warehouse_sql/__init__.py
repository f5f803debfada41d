"""The warehouse schema as numbered SQL migrations, the ETL transforms, and a tiny runner."""

from .runner import Migration, applied_versions, apply_migrations, load_migrations

__all__ = ["Migration", "applied_versions", "apply_migrations", "load_migrations"]
