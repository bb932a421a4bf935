"""What a client is told when a request fails: the first line of the error, with no server path in it."""
import re
from pathlib import Path

ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"`]+/)*[^\s/'\"`]+")  # /a/b/c.mp4: the file name is kept
WINDOWS_PATH = re.compile(r"\b[A-Za-z]:\\(?:[^\s\\'\"`]+\\)*([^\s\\'\"`]+)")


def without_paths(text: str) -> str:
    """`text` with every absolute path cut to its last part (the file's name)."""
    text = ABSOLUTE_PATH.sub(lambda match: Path(match.group(0)).name, text)
    return WINDOWS_PATH.sub(lambda match: match.group(1), text)


def reply(error: BaseException) -> str:
    """The first line of a user error, without server paths, as a `sentence`."""
    lines = str(error).strip().splitlines()
    return sentence(without_paths(lines[0]) if lines else type(error).__name__)


def sentence(text: str) -> str:
    """`text` capitalised, unless it starts with an option name (spelled as in the API, with an underscore)."""
    if "_" in text.split(" ", 1)[0]:
        return text
    return text[0].upper() + text[1:]
