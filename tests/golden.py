"""Discovery of golden forward cases produced by the official implementation.

A golden set is a directory of `<name>.json` descriptions with `<name>.weights.safetensors`
and `<name>.cases.safetensors` beside them (see tests/reference/README.md). The directory
comes from the environment variable PYRAMID_GOLDEN_DIR (default tests/reference/golden).
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from reference import REFERENCE_DIR
from safetensors.torch import load_file

DEFAULT_DIR = REFERENCE_DIR / "golden"

FLUX = "PyramidFluxTransformer"
MMDIT = "PyramidDiffusionMMDiT"
VAE = "CausalVideoVAE"


def golden_dir() -> Path:
    return Path(os.environ.get("PYRAMID_GOLDEN_DIR", DEFAULT_DIR))


@dataclass(frozen=True)
class GoldenCase:
    model: str  # the golden set's model name, e.g. "miniflux_tiny"
    case: str  # the case name, e.g. "history"
    spec_path: Path

    @property
    def id(self) -> str:
        return f"{self.model}-{self.case}"

    def spec(self) -> dict:
        return json.loads(self.spec_path.read_text())

    def case_spec(self) -> dict:
        return self.spec()["cases"][self.case]

    def weights(self):
        return load_file(self.spec_path.parent / self.spec()["files"]["weights"])

    def tensors(self):
        return load_file(self.spec_path.parent / self.spec()["files"]["cases"])


def golden_cases(official_class: str) -> list:
    """Every (model, case) in the golden directory whose official class matches."""
    found = []
    for path in sorted(golden_dir().glob("*.json")):
        spec = json.loads(path.read_text())
        if spec.get("official_class") != official_class:
            continue
        found += [GoldenCase(spec["model"], name, path) for name in spec.get("cases", {})]
    return found


def golden_params(official_class: str) -> list:
    """pytest params for the cases; a single failing param when there are none.

    An empty directory must fail the suite, never let it pass by skipping.
    """
    cases = golden_cases(official_class)
    if cases:
        return [pytest.param(case, id=case.id) for case in cases]
    return [pytest.param(None, id="no-cases-found")]


def require(case):
    if case is None:
        pytest.fail(f"no golden cases found in {golden_dir()} (set PYRAMID_GOLDEN_DIR)")
    return case
