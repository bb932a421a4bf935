"""Where the studio saves each browser session's outputs, and how long they stay.

Local mode: the output folder itself. Hosted mode: one subfolder per session, named by a keyed hash of the
session that no other client can guess, and files older than `max_age` swept away while the studio runs.
"""
import contextlib
import hashlib
import hmac
import os
import secrets
import threading
import time
from pathlib import Path

OUTPUT_MAX_AGE = 6 * 3600  # seconds a hosted output is kept
SWEEP_INTERVAL = 600  # seconds between sweeps in hosted mode


class SessionOutputs:
    def __init__(self, root, hosted: bool = False, max_age: float = OUTPUT_MAX_AGE):
        self.root = Path(root).resolve()
        self.hosted = hosted
        self.max_age = max_age
        self._key = secrets.token_bytes(32)
        self._last_sweep = float("-inf")
        self._lock = threading.Lock()

    def folder(self, session: str) -> Path:
        """The folder this session's outputs go to."""
        if not self.hosted:
            return self.root
        return self.root / hmac.new(self._key, session.encode(), hashlib.sha256).hexdigest()[:32]

    def sweep(self, now: float = None) -> int:
        """In hosted mode, at most every SWEEP_INTERVAL: delete the files of session folders (outputs, queues and
        their inputs) older than `max_age`, and the folders left empty. Returns how many files went."""
        now = time.time() if now is None else now
        with self._lock:
            if not self.hosted or now - self._last_sweep < SWEEP_INTERVAL or not self.root.is_dir():
                return 0
            self._last_sweep = now
            removed = 0
            for folder, subfolders, files in os.walk(self.root, topdown=False):  # never follows a link
                for name in files:
                    file = Path(folder) / name
                    if folder != str(self.root) and now - file.lstat().st_mtime > self.max_age:
                        file.unlink(missing_ok=True)
                        removed += 1
                if folder != str(self.root):
                    with contextlib.suppress(OSError):  # not empty (or a generation just wrote into it)
                        Path(folder).rmdir()
            return removed
