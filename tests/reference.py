"""The authors' reference tables (../shared/reference), for parity tests."""
import json
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def scheduler_tables() -> dict:
    return json.loads((REFERENCE_DIR / "scheduler_tables.json").read_text())


def layout_manifest(name: str) -> dict:
    return json.loads((REFERENCE_DIR / f"layout_{name}.json").read_text())
