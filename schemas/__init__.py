"""Avro schemas (one ``.avsc`` per event) and the single-object codec for them."""

from __future__ import annotations

from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent
"""Directory holding the current ``*.avsc`` files."""
