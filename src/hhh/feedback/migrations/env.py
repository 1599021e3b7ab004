"""Alembic environment: migrate the database named by the config's sqlalchemy.url."""

from alembic import context
from sqlalchemy import create_engine

from hhh.feedback.store import Base

if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as connection:
            # batch mode: SQLite cannot ALTER most things, so changes are made by copying the table
            context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
