"""Autogenerate a migration from the models against a scratch SQLite at head: `python scripts/new_migration.py "message"`."""

import sys
import tempfile

from alembic import command

from shadowjudge.store.database import alembic_config, get_engine, upgrade_database

url = f"sqlite:///{tempfile.mkdtemp()}/scratch.db"
upgrade_database(url)
cfg = alembic_config(url)
with get_engine(url).begin() as conn:
    cfg.attributes["connection"] = conn
    command.revision(cfg, message=sys.argv[1], autogenerate=True, rev_id=sys.argv[2] if len(sys.argv) > 2 else None)
