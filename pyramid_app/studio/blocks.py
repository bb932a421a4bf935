"""The studio's gr.Blocks: Gradio's own refusals of a request's values reworded as one sentence naming the field.

Before a handler runs, Gradio checks the values a client sent: file references with Gradio's meta must lie in its
upload folder, and every value must parse as its component's data model. Its refusals name server paths or dump
pydantic's report over many lines; here each becomes the sentence the handlers use for the same mistake.
"""
import gradio as gr
import pydantic

from ..options.limits import shown
from .replies import sentence
from .uploads import NOT_RECEIVED

FILE_INPUTS = ("Image", "Video", "File", "UploadButton")  # components whose value names a file on the server
EXPECTED = {"Dataframe": "a table: a list of rows, or {'headers': [...], 'data': [[...], ...]}"}


class StudioBlocks(gr.Blocks):
    async def preprocess_data(self, block_fn, inputs, state, explicit_call: bool = False):
        expected = len(block_fn.inputs)
        if len(inputs) < expected:
            raise gr.Error(f"this endpoint takes {expected} values; got {len(inputs)}", print_exception=False)
        names = list(block_fn.input_parameter_names or []) + [None] * expected
        names = [names[index] or getattr(block, "label", None) or f"value {index + 1}"
                 for index, block in enumerate(block_fn.inputs)]
        files = [name for block, name in zip(block_fn.inputs, names) if type(block).__name__ in FILE_INPUTS]
        for block, value, name in zip(block_fn.inputs, inputs, names):
            _check_value(block, value, name, self.upload_file_set)
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except pydantic.ValidationError:  # a file reference Gradio could not read as one
            raise _not_received(files[0] if files else "a file") from None


def _check_value(block, value, name: str, received: set) -> None:
    """Refuse what Gradio would refuse for `block`, with a sentence naming `name`: a file not uploaded, or (other
    components) a value that does not parse. File references are parsed by Gradio after its own checks."""
    if type(block).__name__ in FILE_INPUTS:
        paths = _referenced_paths(value) + ([value] if isinstance(value, str) else [])
        if any(path not in received for path in paths):
            raise _not_received(name)
        return
    model = getattr(block, "data_model", None)
    if model is None or value is None or getattr(block, "stateful", False):
        return
    try:
        model.model_validate(value, context={"validate_meta": True})
    except pydantic.ValidationError:
        expected = EXPECTED.get(type(block).__name__, f"a value of a {type(block).__name__.lower()}")
        raise gr.Error(f"{name} must be {expected}; got {shown(value)}", print_exception=False) from None


def _not_received(name: str) -> gr.Error:
    return gr.Error(sentence(NOT_RECEIVED.format(what=name)), print_exception=False)


def _referenced_paths(value) -> list:
    """The paths of the file references with Gradio's meta in `value` (the ones Gradio checks itself)."""
    if isinstance(value, dict):
        meta = value.get("meta")
        own = [value["path"]] if isinstance(meta, dict) and meta.get("_type") == "gradio.FileData" and isinstance(
            value.get("path"), str) else []
        return own + [path for item in value.values() for path in _referenced_paths(item)]
    if isinstance(value, list):
        return [path for item in value for path in _referenced_paths(item)]
    return []
