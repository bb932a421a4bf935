"""Shared entry point of the command-line tools: logging, one-line user errors, a closing summary."""
import logging
import sys
from typing import Callable


def run_tool(work: Callable[[], str]) -> int:
    """Run `work` (which returns a one-line summary); user errors end with `error: ...` and exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = work()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0
