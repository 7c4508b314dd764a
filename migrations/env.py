"""Alembic environment: runs on the connection handed in by shadowjudge.store, or on sqlalchemy.url."""

from alembic import context
from sqlalchemy import Connection

from shadowjudge.store.database import migration_transaction
from shadowjudge.store.models import Base, render_stored_type

config = context.config
target_metadata = Base.metadata


def run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      render_item=render_stored_type)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    with migration_transaction(config.get_main_option("sqlalchemy.url")) as conn:  # as shadowjudge's upgrade runs
        run_migrations(conn)


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True, render_item=render_stored_type)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
