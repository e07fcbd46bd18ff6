"""Avro single-object encoding of our events, with an in-process schema registry.

Wire format (Avro specification, "Single-object encoding")::

    C3 01 | 8-byte CRC-64-AVRO fingerprint, little-endian | Avro binary body

The fingerprint is the Rabin CRC-64-AVRO of the writer schema's Parsing Canonical Form.

Reading a record without our code (any Avro library):

1. Check the first two bytes are ``C3 01``.
2. Take bytes 2..10: the writer schema's fingerprint. Compute the CRC-64-AVRO fingerprint
   of every ``schemas/*.avsc`` (Java: ``SchemaNormalization.parsingFingerprint64``;
   Python: ``fastavro.schema.fingerprint(to_parsing_canonical_form(s), "CRC-64-AVRO")``,
   whose hex string is already in wire byte order) and pick the matching one.
3. Decode the rest (from byte 10) as plain Avro binary with that writer schema, resolving
   to your own reader schema if it differs. Java's ``BinaryMessageDecoder`` does all three.

Timestamps are ``long`` with logical type ``timestamp-millis`` (UTC epoch milliseconds).
Inside this process they stay plain ``int`` milliseconds (see ``_wire_schema``).
"""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint as avro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from fastavro.validation import validate

from schemas import SCHEMA_DIR

MAGIC = b"\xc3\x01"
HEADER_SIZE = len(MAGIC) + 8


class UndecodableRecord(Exception):
    """A record could not be encoded or decoded; ``reason`` is a short machine code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class SchemaViolation(UndecodableRecord):
    """A record does not satisfy its schema (``field`` names the offending field if known)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__("schema-violation", message)
        self.field = field


class _Entry:
    """One registered schema version."""

    __slots__ = ("fingerprint", "header", "int_fields", "name", "parsed", "schema")

    def __init__(self, name: str, schema: dict[str, Any], parsed: Any, fp: bytes) -> None:
        self.name = name
        self.schema = schema
        self.parsed = parsed
        self.fingerprint = fp
        self.header = MAGIC + fp
        self.int_fields = _int_fields(schema)


_RANGES = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}


def _int_fields(schema: dict[str, Any]) -> tuple[tuple[str, int, int], ...]:
    """Top-level int/long fields with their ranges.

    Why: fastavro silently truncates floats and bools into ints and writes out-of-range ints,
    and its full validator costs ~40 us a record; this check costs well under one.
    """
    found = []
    for field in schema.get("fields", []):
        ftype = field["type"]
        if isinstance(ftype, dict):
            ftype = ftype.get("type")
        if isinstance(ftype, str) and ftype in _RANGES:
            found.append((field["name"], *_RANGES[ftype]))
    return tuple(found)


def _short_name(schema: dict[str, Any]) -> str:
    return str(schema["name"]).rsplit(".", 1)[-1]


def _wire_schema(node: Any) -> Any:
    """Copy of ``node`` without ``timestamp-millis`` logical types.

    Why: fastavro would turn those longs into ``datetime`` on read (slow, and our core works in
    epoch milliseconds). Logical types are not part of the Parsing Canonical Form, so the
    fingerprint and the bytes on the wire are unchanged.
    """
    if isinstance(node, dict):
        if node.get("logicalType") == "timestamp-millis":
            return {k: v for k, v in node.items() if k != "logicalType"}
        return {k: _wire_schema(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_wire_schema(v) for v in node]
    return node


def schema_fingerprint(schema: dict[str, Any] | str) -> bytes:
    """CRC-64-AVRO fingerprint of ``schema`` in wire (little-endian) byte order."""
    canonical = to_parsing_canonical_form(schema)
    # fastavro renders the 8 fingerprint bytes little-endian first, as the spec's wire order.
    return bytes.fromhex(avro_fingerprint(canonical, "CRC-64-AVRO"))


def _first_bad_field(schema: dict[str, Any], record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    for field in schema.get("fields", []):
        name = field["name"]
        value = record.get(name, field.get("default"))
        if name not in record and "default" not in field:
            return name
        single = {"type": "record", "name": "One", "fields": [dict(field, name="v")]}
        if not validate({"v": value}, single, raise_errors=False):
            return name
    return None


class SchemaRegistry:
    """Name <-> schema <-> fingerprint, current versions plus any older/newer writer versions."""

    def __init__(self) -> None:
        self._by_fingerprint: dict[bytes, _Entry] = {}
        self._current: dict[str, _Entry] = {}

    @classmethod
    def load_default(cls, directory: Path = SCHEMA_DIR) -> SchemaRegistry:
        """Registry whose current versions are the ``*.avsc`` files in ``directory``, and which
        also reads the earlier versions kept in its ``history/`` (``<Name>.<fingerprint>.avsc``):
        topics are kept forever, so a record written by any earlier version stays readable."""
        registry = cls()
        for path in sorted(directory.glob("history/*.avsc")):
            registry.register(json.loads(path.read_text()))
        for path in sorted(directory.glob("*.avsc")):
            registry.register(json.loads(path.read_text()), current=True)
        return registry

    def register(self, schema: dict[str, Any], *, current: bool = False) -> bytes:
        """Register a schema version (``current`` makes it the reader schema for its name)."""
        name = _short_name(schema)
        fp = schema_fingerprint(schema)
        entry = self._by_fingerprint.get(fp)
        if entry is None:
            # A fresh named-types dict per version: old and new versions may both define
            # e.g. RejectionReason, with different symbols.
            parsed = parse_schema(_wire_schema(schema), named_schemas={})
            entry = _Entry(name, schema, parsed, fp)
            self._by_fingerprint[fp] = entry
        if current:
            self._current[name] = entry
        return fp

    def names(self) -> list[str]:
        """Names of the records with a current version."""
        return sorted(self._current)

    def schema(self, name: str) -> dict[str, Any]:
        """Current declared schema (as in the ``.avsc`` file) for ``name``."""
        return self._entry(name).schema

    def fingerprint(self, name: str) -> bytes:
        """Wire fingerprint of the current version of ``name``."""
        return self._entry(name).fingerprint

    def name_of(self, fingerprint: bytes) -> str:
        """Record name of the schema with this fingerprint."""
        entry = self._by_fingerprint.get(fingerprint)
        if entry is None:
            raise UndecodableRecord("unknown-fingerprint", f"no schema {fingerprint.hex()}")
        return entry.name

    def _entry(self, name: str) -> _Entry:
        try:
            return self._current[name]
        except KeyError:
            raise SchemaViolation(f"no current schema named {name!r}") from None

    def encode(self, name: str, record: dict[str, Any]) -> bytes:
        """Single-object encoding of ``record`` with the current schema of ``name``."""
        return self._encode_with(self._entry(name), record)

    def encode_as(self, fingerprint: bytes, record: dict[str, Any]) -> bytes:
        """Encode with a specific registered version (tests, migrations)."""
        entry = self._by_fingerprint.get(fingerprint)
        if entry is None:
            raise SchemaViolation(f"no schema with fingerprint {fingerprint.hex()}")
        return self._encode_with(entry, record)

    @staticmethod
    def _encode_with(entry: _Entry, record: dict[str, Any]) -> bytes:
        """Encode ``record`` with a registry entry."""
        for name, lo, hi in entry.int_fields:
            value = record.get(name)
            if value is not None and (type(value) is not int or not lo <= value <= hi):
                raise SchemaViolation(f"{entry.name}: {name}={value!r} is not an Avro int", name)
        out = BytesIO()
        out.write(entry.header)
        try:
            schemaless_writer(out, entry.parsed, record)
        except Exception as exc:  # fastavro raises assorted types for bad values
            field = _first_bad_field(entry.schema, record)
            where = f" (field {field!r})" if field else ""
            raise SchemaViolation(f"{entry.name}{where}: {exc}", field) from None
        return out.getvalue()

    def decode(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """Decode a single-object record into (record name, dict), resolved to our version."""
        if len(data) < HEADER_SIZE or data[:2] != MAGIC:
            raise UndecodableRecord("bad-magic", "not Avro single-object encoding")
        writer = self._by_fingerprint.get(data[2:HEADER_SIZE])
        if writer is None:
            raise UndecodableRecord("unknown-fingerprint", f"no schema {data[2:HEADER_SIZE].hex()}")
        reader = self._current.get(writer.name, writer)
        src = BytesIO(data)
        src.seek(HEADER_SIZE)
        try:
            if reader is writer:
                record = schemaless_reader(src, writer.parsed, None)
            else:
                record = schemaless_reader(src, writer.parsed, reader.parsed)
        except Exception as exc:  # EOFError, UnicodeDecodeError, IndexError, ...
            raise UndecodableRecord(
                "truncated-or-corrupt", f"{writer.name}: {type(exc).__name__}: {exc}"
            ) from None
        if src.tell() != len(data) or not isinstance(record, dict):
            raise UndecodableRecord("truncated-or-corrupt", f"{writer.name}: trailing bytes")
        return writer.name, record


_default: SchemaRegistry | None = None


def default_registry() -> SchemaRegistry:
    """Registry of the packaged ``.avsc`` files, built on first use."""
    global _default
    if _default is None:
        _default = SchemaRegistry.load_default()
    return _default


def encode(name: str, record: dict[str, Any]) -> bytes:
    """Encode with the default registry."""
    return default_registry().encode(name, record)


def decode(data: bytes) -> tuple[str, dict[str, Any]]:
    """Decode with the default registry."""
    return default_registry().decode(data)
