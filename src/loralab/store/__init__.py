"""Storage: SQLAlchemy models, Alembic migrations and the repository holding all SQL."""
