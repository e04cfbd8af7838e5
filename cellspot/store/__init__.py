"""The label store: ORM models (:mod:`.models`), engines and sessions (:mod:`.db`),
Alembic migrations (:mod:`.migrate`) and query helpers (:mod:`.queries`).

Helpers take a caller-owned :class:`sqlalchemy.orm.Session` and never commit.
"""
