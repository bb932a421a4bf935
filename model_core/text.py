"""Prompt encoding: pooled CLIP vectors and masked per-token T5 states, for miniFLUX and SD3 checkpoints."""
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from .checkpoints import detect_family
from .weight_files import MODEL_BUILD_LOCK, check_finite, check_plain_files, check_weights_fit

logger = logging.getLogger(__name__)

T5_MAX_LENGTH = 128
CLIP_MAX_LENGTH = 77
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = {  # any one of these file sets is enough to load the tokenizer
    CLIPTokenizer: (("tokenizer.json",), ("vocab.json", "merges.txt")),
    T5Tokenizer: (("tokenizer.json",), ("spiece.model",)),
}


@dataclass(frozen=True)
class PromptEmbeddings:
    """What the diffusion transformers take: T5 states [B, 128, D], their 1/0 mask [B, 128], pooled CLIP [B, P]."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    pooled: torch.Tensor

    def to(self, device) -> "PromptEmbeddings":
        return PromptEmbeddings(self.hidden_states.to(device), self.attention_mask.to(device), self.pooled.to(device))

    def followed_by(self, other: "PromptEmbeddings") -> "PromptEmbeddings":
        """This batch's rows, then `other`'s (e.g. [negative ; prompt] for classifier-free guidance)."""
        return PromptEmbeddings(torch.cat([self.hidden_states, other.hidden_states]),
                                torch.cat([self.attention_mask, other.attention_mask]), torch.cat([self.pooled, other.pooled]))

    def without_padding_columns(self) -> "PromptEmbeddings":
        """The trailing token columns that are padding in every row dropped: no valid token attends to a padded one
        and the transformer's outputs there are discarded, so only the work on them goes (rounding aside)."""
        used = self.attention_mask.bool().any(0).nonzero()
        length = int(used.max()) + 1 if len(used) else 1
        return PromptEmbeddings(self.hidden_states[:, :length], self.attention_mask[:, :length], self.pooled)

    def repeat(self, batch: int) -> "PromptEmbeddings":
        """Repeat a single-prompt embedding `batch` times along the batch axis."""
        return PromptEmbeddings(
            self.hidden_states.repeat(batch, 1, 1), self.attention_mask.repeat(batch, 1), self.pooled.repeat(batch, 1)
        )


class PromptEncoder:
    """CLIP encoders give the pooled vector, the T5 encoder the per-token states; subclasses name the folders."""

    clip_folders: tuple[str, ...]
    clip_class: type
    clip_output: str
    t5_folder: str

    def __init__(self, encoders: dict[str, torch.nn.Module], tokenizers: dict[str, object]):
        self.encoders = encoders
        self.tokenizers = tokenizers
        self._empty_cache = None

    @classmethod
    def layout(cls) -> str:
        """The subfolders this family needs, for error messages."""
        folders = [*cls.clip_folders, cls.t5_folder]
        return ", ".join(f"{name}/ + {_tokenizer_folder(name)}/" for name in folders)

    @classmethod
    def encoder_classes(cls) -> dict:
        """Encoder folder -> the transformers class it loads as."""
        return {name: cls.clip_class for name in cls.clip_folders} | {cls.t5_folder: T5EncoderModel}

    @classmethod
    def tokenizer_classes(cls) -> dict:
        """Encoder folder -> the tokenizer class of its tokenizer folder."""
        return {name: CLIPTokenizer for name in cls.clip_folders} | {cls.t5_folder: T5Tokenizer}

    @classmethod
    def check_files(cls, root: Path) -> None:
        """Refuse, before anything is built, a checkpoint root whose encoder or tokenizer folders lack a file, hold
        something that is not a plain file, or hold encoder weights that do not fit their config (a missing tensor
        would otherwise be initialised at random)."""
        for name, tokenizer_class in cls.tokenizer_classes().items():
            for folder in (root / name, root / _tokenizer_folder(name)):
                if folder.is_dir():
                    check_plain_files(folder)
            _require(root / name, [("config.json",)], cls.layout())
            _require(root / name, [(file,) for file in WEIGHT_FILES], cls.layout())
            _require(root / _tokenizer_folder(name), TOKENIZER_FILES[tokenizer_class], cls.layout())
        for name, model_class in cls.encoder_classes().items():
            check_weights_fit(model_class, root / name)

    @classmethod
    def from_pretrained(cls, root, torch_dtype=torch.float32, device=None, t5_quantization_config=None) -> "PromptEncoder":
        """Load the encoders and tokenizers from the official subfolders of a checkpoint root, once `check_files`
        passes; a bitsandbytes `t5_quantization_config` loads the T5 encoder quantised straight onto `device`."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Checkpoint folder {root} does not exist.")
        cls.check_files(root)
        t5_kwargs = {"quantization_config": t5_quantization_config, "device_map": {"": device}} if t5_quantization_config else {}
        encoders = {name: _load_encoder(root / name, model_class, torch_dtype, **(t5_kwargs if name == cls.t5_folder else {}))
                    for name, model_class in cls.encoder_classes().items()}
        tokenizers = {name: tokenizer_class.from_pretrained(root / _tokenizer_folder(name))
                      for name, tokenizer_class in cls.tokenizer_classes().items()}
        return cls(encoders, tokenizers).to(device)

    def to(self, device=None, dtype=None) -> "PromptEncoder":
        """Move every encoder to `device` and/or `dtype` (None keeps it); quantised encoders stay put."""
        for encoder in self.encoders.values():
            if not getattr(encoder, "is_quantized", False):
                encoder.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, device=None) -> PromptEmbeddings:
        """Encode prompts; outputs land on `device` (default: the T5 encoder's device)."""
        prompts = _prompt_list(prompts)
        device = device or _device_of(self.encoders[self.t5_folder])
        pooled = torch.cat([self._clip_pooled(name, prompts).to(device) for name in self.clip_folders], dim=-1)
        hidden_states, attention_mask = self._t5_states(prompts)
        return PromptEmbeddings(hidden_states.to(device), attention_mask.to(device), pooled)

    def encode_negative(self, negative_prompt: str | None, batch: int, device=None) -> PromptEmbeddings:
        """Embeddings of the negative prompt for classifier-free guidance; the empty prompt is computed once."""
        if negative_prompt:
            return self.encode([negative_prompt] * batch, device)
        key = tuple((_device_of(encoder), _dtype_of(encoder)) for encoder in self.encoders.values())
        if self._empty_cache is None or self._empty_cache[0] != key:
            self._empty_cache = (key, self.encode(""))
        return self._empty_cache[1].repeat(batch).to(device or _device_of(self.encoders[self.t5_folder]))

    def _clip_pooled(self, name: str, prompts: list[str]) -> torch.Tensor:
        encoder = self.encoders[name]
        tokens = _tokenize(self.tokenizers[name], prompts, CLIP_MAX_LENGTH, name)
        return getattr(encoder(input_ids=tokens.input_ids.to(_device_of(encoder))), self.clip_output)

    def _t5_states(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = self.encoders[self.t5_folder]
        tokens = _tokenize(self.tokenizers[self.t5_folder], prompts, T5_MAX_LENGTH, self.t5_folder)
        device = _device_of(encoder)
        attention_mask = tokens.attention_mask.to(device)
        hidden_states = encoder(input_ids=tokens.input_ids.to(device), attention_mask=attention_mask).last_hidden_state
        return hidden_states, attention_mask


class FluxPromptEncoder(PromptEncoder):
    """miniFLUX: pooled = CLIP-L pooler output (768); per-token = T5-XXL (4096)."""

    clip_folders = ("text_encoder",)
    clip_class = CLIPTextModel
    clip_output = "pooler_output"
    t5_folder = "text_encoder_2"


class SD3PromptEncoder(PromptEncoder):
    """SD3: pooled = concat(CLIP-L, CLIP-G projected text embeds) (768 + 1280); per-token = T5-XXL (4096)."""

    clip_folders = ("text_encoder", "text_encoder_2")
    clip_class = CLIPTextModelWithProjection
    clip_output = "text_embeds"
    t5_folder = "text_encoder_3"


PROMPT_ENCODERS = {"miniflux": FluxPromptEncoder, "sd3": SD3PromptEncoder}


def load_prompt_encoder(root, family: str | None = None, torch_dtype=torch.float32, device=None) -> PromptEncoder:
    """Load the prompt encoder of a checkpoint root; `family` ('miniflux' or 'sd3') is detected when None."""
    family = family or detect_family(Path(root)).name
    if family not in PROMPT_ENCODERS:
        raise ValueError(f"Unknown model family {family!r}; use one of {sorted(PROMPT_ENCODERS)}.")
    return PROMPT_ENCODERS[family].from_pretrained(root, torch_dtype=torch_dtype, device=device)


def _prompt_list(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if not prompts:
        raise ValueError("No prompt given: pass a string or a non-empty list of strings.")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError("Every prompt must be a string.")
    return prompts


def _tokenize(tokenizer, prompts: list[str], max_length: int, name: str):
    """Right-padded, truncated token ids and mask; warns about each prompt that was cut."""
    for index, ids in enumerate(tokenizer(prompts, verbose=False).input_ids):
        if len(ids) > max_length:
            logger.warning(
                "Prompt %d of %d is %d tokens long for %s, which reads only the first %d; the rest is ignored.",
                index + 1, len(prompts), len(ids), name, max_length,
            )
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     padding_side="right", return_tensors="pt")


def _load_encoder(folder: Path, model_class, torch_dtype, **kwargs) -> torch.nn.Module:
    with MODEL_BUILD_LOCK:
        encoder = model_class.from_pretrained(folder, dtype=torch_dtype, use_safetensors=True, use_kernels=False,
                                              **kwargs)  # no hub kernels: nothing is fetched at run time
    check_finite(encoder, folder)
    return encoder.eval().requires_grad_(False)


def _require(folder: Path, file_sets, layout: str) -> None:
    """Raise FileNotFoundError unless `folder` holds every file of at least one of `file_sets`."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Missing folder {folder}; the checkpoint layout is: {layout}.")
    if not any(all((folder / file).is_file() for file in files) for files in file_sets):
        wanted = " or ".join(" + ".join(files) for files in file_sets)
        raise FileNotFoundError(f"{folder} lacks {wanted}; the checkpoint layout is: {layout}.")


def _tokenizer_folder(encoder_name: str) -> str:
    return encoder_name.replace("text_encoder", "tokenizer")


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
