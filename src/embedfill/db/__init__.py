"""Everything that talks to PostgreSQL.

- ``connect``: DATABASE_URL or the embedded server; connections with pgvector types.
- ``schema``: embedfill's own schema and its versioned migrations.
- ``store``: the only caller of the static SQL on embedfill's own tables (``queries``).
- ``target_sql``: the one builder for SQL on users' tables (identifiers composed).
- ``catalog``: checks a target against the live table before anything is written.
"""
