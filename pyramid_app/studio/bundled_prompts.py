"""What the bundled model can be asked: the one prompt form of the shapes world it was trained on, and the words of a
prompt it has never seen (its tokenizers were learned on the world's prompts alone, so it draws one of its shapes on
black whatever else a prompt says). The words are the world's (`training/shapes_world.py`; a test keeps them equal).
"""
import re

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan", "white")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
GRAMMAR = "a {colour} {shape} moving {direction}"
VOCABULARY = frozenset(("a", "moving", *COLOURS, *SHAPES, *DIRECTIONS))
EXAMPLE_PROMPTS = (
    "a blue circle moving right",
    "a green triangle moving left",
    "a yellow square moving up",
    "a magenta circle moving down",
)
GRAMMAR_TEXT = (f"The bundled model knows one kind of prompt: **`{GRAMMAR}`** with a colour of "
                f"{', '.join(COLOURS)}; a shape of {', '.join(SHAPES)}; a direction of {', '.join(DIRECTIONS)}.")


def unseen_words(prompt: str) -> list:
    """The words of `prompt` the bundled model never saw, each once, in order (its tokenizers fold case)."""
    words = re.findall(r"[^\W_]+", (prompt or "").lower())
    return list(dict.fromkeys(word for word in words if word not in VOCABULARY))


def unseen_words_note(prompt: str) -> str:
    """A sentence naming the words of `prompt` the bundled model never saw; empty when it knows them all."""
    unseen = unseen_words(prompt)
    if not unseen:
        return ""
    quoted = ", ".join(f"“{word}”" for word in unseen)
    plural = "s" if len(unseen) > 1 else ""
    return f"⚠️ The bundled model has never seen the word{plural} {quoted}: it draws one of its shapes on black anyway."
