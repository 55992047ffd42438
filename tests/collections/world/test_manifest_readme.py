"""The curation README's manifest table is the manifest's schema: every column, its type, in order."""

from __future__ import annotations

import re
from pathlib import Path

from cupola.collections.world.curation.manifest import COLUMNS, manifest_schema

README = Path(__file__).resolve().parents[3] / "cupola" / "collections" / "world" / "curation" / "README.md"


def test_readme_table_lists_every_manifest_column_with_its_type():
    rows = re.findall(r"^\| `([a-z_]+)` \| (\w+) \| (.+) \|$", README.read_text(), flags=re.MULTILINE)
    assert [(name, kind) for name, kind, _ in rows] == [(name, kind) for name, (kind, _) in COLUMNS.items()]
    assert [text for _, _, text in rows] == [text for kind, text in COLUMNS.values()]


def test_schema_is_the_documented_columns_plus_one_per_learned_filter():
    schema = manifest_schema(["text_overlay"])
    assert schema.names == [*COLUMNS, "learned_text_overlay"]
    assert [str(schema.field(name).type) for name in COLUMNS] == [
        {"string": "string", "int64": "int64", "int32": "int32", "float64": "double"}[kind]
        for kind, _ in COLUMNS.values()
    ]
