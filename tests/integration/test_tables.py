"""The SQLAlchemy Core tables the code uses agree with the database that schema.sql builds."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from worker.tables import metadata


def sql_type(column_type: sa.types.TypeEngine) -> str:
    return column_type.compile(dialect=postgresql.dialect())


@pytest.mark.parametrize("table", sorted(metadata.tables.values(), key=lambda t: t.name), ids=lambda t: t.name)
def test_table_matches_schema(connection: sa.Connection, table: sa.Table) -> None:
    actual = {column["name"]: column for column in sa.inspect(connection).get_columns(table.name)}
    for column in table.columns:
        assert column.name in actual, f"{table.name}.{column.name} is not in schema.sql"
        found = actual[column.name]
        code_type, schema_type = sql_type(column.type), sql_type(found["type"])
        assert code_type == schema_type, f"{table.name}.{column.name}: code says {code_type}, schema {schema_type}"
        if not column.primary_key:
            assert found["nullable"] == column.nullable, f"{table.name}.{column.name} nullability differs"
    primary_key = sa.inspect(connection).get_pk_constraint(table.name)["constrained_columns"]
    assert primary_key == [column.name for column in table.primary_key.columns]
