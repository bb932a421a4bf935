"""Files a writer holds while it writes them, so that a sweep of abandoned files leaves them alone.

Where there is `fcntl` (Linux, macOS) the writer holds an exclusive `flock` on an open descriptor; the lock dies
with the writer's process. On Windows there is no `flock`, and none is needed: a file that a process holds open
cannot be removed there, and the writer keeps its descriptor open until the file is renamed into place.
"""
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def hold(handle: int) -> None:
    """Hold the file open as `handle` (an `os.open` descriptor) until the descriptor is closed or `replace_held`."""
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX)


def replace_held(handle: int, source: Path, target: Path) -> None:
    """Rename the held file `source` onto `target` and let it go (Windows renames no open file: it lets go first)."""
    if fcntl is None:
        os.close(handle)
        os.replace(source, target)
    else:
        os.replace(source, target)
        os.close(handle)


def remove_unless_held(path: Path) -> bool:
    """Remove `path` unless a live writer holds it; True when it was removed."""
    if fcntl is None:
        try:
            path.unlink()
        except (PermissionError, FileNotFoundError):  # PermissionError: another process has it open
            return False
        return True
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(handle)
