"""How the benchmarks hand over their figures: JSON on stdout (atomically into a file when asked), and read back
from a child process that printed them as its last line."""
import json
import subprocess

from training.atomic import write_text


def report(figures: dict, out=None) -> None:
    text = json.dumps(figures, indent=2)
    print(text)
    if out:
        write_text(out, text + "\n")


def child_figures(command: list, cwd=None):
    """Run `command` (a process that prints its figures as JSON on its last line) and return them; a failing child
    raises with the end of its stderr."""
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, cwd=cwd)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, command[:4]))} ... failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
