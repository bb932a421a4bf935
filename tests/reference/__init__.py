"""The authors' reference data (this folder, described in its README.md), for parity tests."""
import json
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent


def scheduler_tables() -> dict:
    return json.loads((REFERENCE_DIR / "scheduler_tables.json").read_text())


def layout_manifest(name: str) -> dict:
    return json.loads((REFERENCE_DIR / f"layout_{name}.json").read_text())
