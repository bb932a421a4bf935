"""The studio's model menu: which checkpoints to offer, their variants and length limits, without loading any.

A menu value is "bundled" (or "bundled-turbo", its few-step distillation), a hub repo id, or a local checkpoint
folder. In hosted mode the menu is an allow-list: the bundled models, the published repos and the folders the
operator named, each folder offered under its name; any other value a client sends is refused with one sentence
that says nothing about the disk.
"""
from dataclasses import dataclass
from pathlib import Path

from model_core.checkpoints import (FAMILIES, VARIANTS, SamplingDefaults, VariantSpec, available_variants, detect_family,
                                    with_overrides)
from model_core.loading import HUB_ID

from .settings import BUNDLED, BUNDLED_MODEL, BUNDLED_MODELS, BUNDLED_TURBO

HUB_MODELS = {"rain1011/pyramid-flow-miniflux": "miniflux", "rain1011/pyramid-flow-sd3": "sd3"}
PUBLISHED_VARIANTS = ("384p", "768p")
MISSING_BUNDLED = (f"The bundled model is not installed yet (expected `{BUNDLED_MODEL}`). "
                   "Pick `rain1011/pyramid-flow-miniflux` or `rain1011/pyramid-flow-sd3` (downloaded on first use), "
                   "or type the path of a local checkpoint folder.")


@dataclass(frozen=True)
class ModelFacts:
    """What the menu knows about a model before loading it: variants, their specs, its sampling defaults,
    a note for the user."""

    variants: tuple  # without "auto"; "auto" means the first
    specs: dict
    note: str = ""
    sampling: SamplingDefaults = SamplingDefaults()

    def spec(self, variant: str):
        """The spec that variant "auto" (or the named one) would load, or None when unknown."""
        name = self.variants[0] if variant == "auto" and self.variants else variant
        return self.specs.get(name)


class ModelMenu:
    """The models a studio offers. Local mode: `models` first, and any folder or repo id typed in.
    Hosted mode: only the bundled model, the published repos and `models` (operator folders or repo ids)."""

    def __init__(self, models=(), hosted: bool = False):
        self.hosted = hosted
        self.folders = {}  # menu value -> folder, for the operator's folders
        extra = []
        for model in models or ():
            model = str(model)
            if model in HUB_MODELS or model in BUNDLED_MODELS or not (hosted and Path(model).expanduser().is_dir()):
                extra.append((model, model))
                continue
            name = _unique(Path(model).name, self.folders)
            self.folders[name] = str(Path(model).expanduser().resolve())
            extra.append((name, name))
        self.offered = list(dict.fromkeys([*extra, *_base_choices()]))
        self.default = self.offered[0][1]

    def choices(self) -> list:
        """(label, value) pairs for the dropdown; local folders are labelled by their name."""
        return [(_label(label), value) for label, value in self.offered]

    def source_for(self, choice) -> str:
        """The `ModelOptions.model` a menu value names (None: the bundled model); hosted mode refuses others."""
        if self.hosted:
            allowed = {value for _, value in self.offered}
            if not isinstance(choice, str) or choice not in allowed:
                raise ValueError(f"This studio offers only these models: {', '.join(sorted(allowed))}; "
                                 "pick one from the Model menu.")
            return self.folders.get(choice) or source_for(choice)
        if choice is not None and not isinstance(choice, str):
            raise ValueError(f"the model must be a menu value, folder or hub repo id (text); got {type(choice).__name__}")
        return source_for(choice)

    def facts(self, choice) -> "ModelFacts":
        try:
            source = self.source_for(choice)
        except ValueError as error:
            return ModelFacts((), {}, str(error))
        return model_facts(BUNDLED if source is None else source)

    def choice_for(self, source) -> str:
        """The menu value for a model recorded in an output's settings (a hosted folder by its name)."""
        by_folder = {folder: name for name, folder in self.folders.items()}
        return by_folder.get(str(source), choice_for(source))

    def is_local(self, choice) -> bool:
        try:
            source = self.source_for(choice)
        except ValueError:
            return False
        return is_local(BUNDLED if source is None else source)


def _base_choices() -> list:
    """The bundled model (marked when missing), its turbo where installed, then the published repos."""
    bundled, turbo = BUNDLED_MODELS[BUNDLED], BUNDLED_MODELS[BUNDLED_TURBO]
    bundled_label = f"{bundled.name} (bundled)" + ("" if bundled.is_dir() else " — not installed")
    turbo_choice = [(f"{turbo.name} (bundled, few-step: fast)", BUNDLED_TURBO)] if turbo.is_dir() else []
    return [(bundled_label, BUNDLED), *turbo_choice] + [(repo, repo) for repo in HUB_MODELS]


def _unique(name: str, taken: dict) -> str:
    candidate, number = name, 2
    while candidate in taken or candidate in HUB_MODELS or candidate in BUNDLED_MODELS:
        candidate, number = f"{name}-{number}", number + 1
    return candidate


def _label(value: str) -> str:
    """A local folder by its name, not the server's absolute path."""
    path = Path(value).expanduser()
    return f"{path.name} (local folder)" if path.is_absolute() else value


def source_for(choice: str):
    """The `ModelOptions.model` for a menu value: None for the bundled model, else the value itself."""
    choice = (choice or "").strip()
    return None if choice in ("", BUNDLED) else choice


def choice_for(source) -> str:
    """The menu value for a model recorded in an output's settings."""
    by_folder = {str(folder): name for name, folder in BUNDLED_MODELS.items()}
    return BUNDLED if source in (None, "") else by_folder.get(str(source), str(source))


def is_local(choice: str) -> bool:
    """Whether the menu value names a checkpoint on this machine (nothing to download)."""
    return (bundled_folder(choice) or Path(source_for(choice))).expanduser().is_dir()


def bundled_folder(choice):
    """The folder of the bundled model a menu value names, else None."""
    return BUNDLED_MODELS.get(source_for(choice) or BUNDLED)


def model_facts(choice: str) -> ModelFacts:
    source, bundled = source_for(choice), bundled_folder(choice)
    if bundled is not None:
        if not bundled.is_dir():
            return ModelFacts((), {}, MISSING_BUNDLED if source is None else
                              f"The few-step model is not installed (expected `{bundled}`); pick the bundled model.")
        return _local_facts(bundled)
    if source in HUB_MODELS:
        family = FAMILIES[HUB_MODELS[source]]
        specs = {name: family.variants[name] for name in PUBLISHED_VARIANTS}
        return ModelFacts(PUBLISHED_VARIANTS, specs, f"`{source}` is downloaded from the Hugging Face Hub on first use.",
                          family.sampling)
    folder = Path(source).expanduser()
    if folder.is_dir():
        return _local_facts(folder)
    if HUB_ID.match(source):
        return ModelFacts(tuple(VARIANTS), dict(VARIANTS), f"`{source}` is treated as a hub repo id and downloaded on first use.")
    return ModelFacts((), {}, f"No checkpoint folder at `{source}`; give a folder with the official layout or a hub repo id.")


def _local_facts(folder: Path) -> ModelFacts:
    try:
        family = with_overrides(folder, detect_family(folder))
    except ValueError as error:  # a damaged or hand-edited pyramid_flow.json
        return ModelFacts((), {}, f"`{folder}` cannot be used: {error}")
    variants = tuple(available_variants(folder, family))
    if not variants:
        return ModelFacts((), {}, f"`{folder}` has no `diffusion_transformer_<variant>/` folder.")
    return ModelFacts(variants, {name: family.variants[name] for name in variants if name in family.variants},
                      sampling=family.sampling)


def length_limits(spec: VariantSpec, extension: bool = False, long_video: bool = False) -> tuple:
    """(minimum, maximum, step) of the frame slider: 1 + nk frames for a clip, nk new frames for an extension
    (n = the VAE's `frames_per_latent`, 8 in the published models); up to the published length, or with
    `long_video` up to the long-video length (20 s, or the published one if longer)."""
    n = spec.frames_per_latent
    most = spec.frames(spec.longest_latent_frames) if long_video else spec.max_frames
    if extension:
        return n, max(n, most - 1), n
    return (spec.frames(2), most, n) if spec.max_latent_frames >= 2 else (1, 1, n)
