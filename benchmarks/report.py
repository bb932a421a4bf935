"""How the benchmarks hand over their figures: JSON on stdout, and atomically into a file when asked."""
import json

from training.atomic import write_text


def report(figures: dict, out=None) -> None:
    text = json.dumps(figures, indent=2)
    print(text)
    if out:
        write_text(out, text + "\n")
