"""The centre stays easy to read: no function over FUNCTION_LINES lines in model_core/ and pyramid_app/, and the
pipeline class under PIPELINE_LINES (the plan, the runner and loading live in their own modules)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUNCTION_LINES = 60
PIPELINE_LINES = 250


def definitions(package: str):
    """(file, node) for every function and class defined anywhere in `package`."""
    for file in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield file, node


def length(node) -> int:
    return node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_a_screen():
    long = [f"{file.relative_to(ROOT)}:{node.lineno} {node.name} ({length(node)} lines)"
            for package in ("model_core", "pyramid_app") for file, node in definitions(package)
            if not isinstance(node, ast.ClassDef) and length(node) > FUNCTION_LINES]
    assert long == []


def test_the_pipeline_class_reads_in_one_sitting():
    [pipeline] = [node for file, node in definitions("model_core") if node.name == "PyramidFlowPipeline"]
    assert length(pipeline) < PIPELINE_LINES
