"""Files written whole or not at all: text goes to a temporary sibling, then is renamed into place."""
from pathlib import Path


def write_text(path, text: str) -> Path:
    """Write `text` to `path` (creating its folder) so that readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)
    return path
