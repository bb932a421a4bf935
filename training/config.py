"""Recipes: a YAML file plus `key.path=value` overrides, read into a nested dict, and the typed schema a recipe is
checked against before a run starts (`check_recipe`)."""
import dataclasses
import difflib
import functools
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, Optional, Union

import yaml

CONFIG_DIR = Path(str(resources.files("training") / "configs"))  # package data in an installed copy
CHECKOUT_PREFIX = Path("training") / "configs"
# YAML 1.1 (PyYAML) reads `1e-3` as a string; a recipe means the number, as YAML 1.2 does
SCIENTIFIC = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class RecipeLoader(yaml.SafeLoader):
    """safe_load with `1e-3`, `5E4` read as floats."""


RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", SCIENTIFIC, list("-+0123456789."))


def parse_yaml(text: str, source: str):
    """The YAML in `text`; malformed YAML is a ValueError naming `source`, the line and column and the fault."""
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ValueError(f"{source} is not valid YAML{where}: {problem}") from None


def recipe_path(path) -> Path:
    """A recipe file: `path` as given, else, for `training/configs/NAME` or a bare NAME, the shipped one."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.relative_to(CHECKOUT_PREFIX) if path.is_relative_to(CHECKOUT_PREFIX) else path
    shipped = CONFIG_DIR / name
    if not path.is_absolute() and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"no recipe at {path}; recipes live in {CONFIG_DIR}")


def load_config(path, overrides=()) -> dict:
    """Read a recipe; every override is `dotted.key=value` with the value parsed as YAML."""
    path = recipe_path(path)
    config = parse_yaml(path.read_text(), str(path)) or {}
    for key, value in parse_overrides(overrides):
        set_path(config, key, value)
    return config


def parse_overrides(overrides) -> list:
    """[(dotted key, YAML value)] of `dotted.key=value` strings."""
    parsed = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r} must look like section.key=value")
        parsed.append((key, parse_yaml(value, f"the value of override {override!r}")))
    return parsed


def set_path(config: dict, dotted: str, value) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted}: {name} is not a section")
    node[leaf] = value


# --- the recipe schema: what each section may hold and of which type -----------------------------------------------
# A key a recipe gives that is not listed here is refused with the nearest listed name, so a typo such as
# `train.ema_decy` stops the launch instead of training without EMA. Keys without a default must be given.

Number = Union[int, float]
Dtype = Literal["float32", "bfloat16", "float16"]
TRACKERS = ("tensorboard", "wandb", "csv", "none")
Tracker = Literal["tensorboard", "wandb", "csv", "none"]


@dataclass
class LoRASection:
    rank: int
    alpha: Optional[int] = None
    target_modules: Optional[list[str]] = None


@dataclass
class ModelSection:
    pretrained: str  # a checkpoint root, a hub id, a run's checkpoint-N (sharded or not) or an export
    variant: str = "auto"
    family: Literal["auto", "miniflux", "sd3"] = "auto"
    config: Optional[dict] = None  # transformer config changes: train from scratch
    vae_config: Optional[dict] = None  # VAE config changes: train a VAE from scratch
    trainable: Literal["all", "decoder"] = "all"
    gradient_checkpointing: bool = False
    frozen_dtype: Dtype = "float32"
    save_variant: Optional[str] = None
    lora: Optional[LoRASection] = None


@dataclass
class FlowObjective:
    stages: int = 1
    history_noise_max: Number = 0.0
    text_dropout: Number = 0.0


@dataclass
class VAEObjective:
    kl_weight: Number
    reconstruction: Literal["l1", "l2"] = "l1"
    foreground_weight: Optional[Number] = None


@dataclass
class ClipPhase:
    seconds: Union[Number, list[Number]]  # a length, or a [min, max] range
    until_step: Optional[int] = None


@dataclass
class DataSection:
    annotations: list[str]
    buckets: list[list[int]]
    fps: Number
    empty_text_fea: Optional[str] = None
    image_ratio: Optional[Number] = None
    clip_schedule: list[ClipPhase] = field(default_factory=list)
    num_workers: int = 0


@dataclass
class OptimSection:
    lr: Number
    betas: list[Number]
    eps: Number
    weight_decay: Number
    warmup_steps: int
    grad_clip: Optional[Number] = None
    final_lr_ratio: Number = 1.0


@dataclass
class TrainSection:
    output_dir: str
    seed: int
    global_batch_size: int
    max_steps: int
    checkpoint_every: int
    gradient_accumulation_steps: Optional[int] = 1  # with tokens_per_gpu: null or left out, derived from the world size
    tokens_per_gpu: Optional[int] = None  # image tokens one micro-batch packs per process (training.packing)
    pack_samples: bool = True  # a micro-batch's samples run as one packed sequence (False: one forward per sample)
    fsdp_units: Literal["blocks", "model"] = "blocks"  # FSDP2 per transformer block then the root, or one unit
    compile_blocks: bool = False  # torch.compile each transformer block
    mixed_precision: Union[Literal["no", "fp16", "bf16"], Literal[False]] = "no"  # YAML reads a bare `no` as false
    ema_decay: Optional[Number] = None
    log_every: int = 1
    keep_checkpoints: int = 0
    report_to: Union[Tracker, list[Tracker]] = field(default_factory=lambda: ["tensorboard", "csv"])


@dataclass
class ValidationSection:
    every_steps: Optional[int] = None
    prompts: list[str] = field(default_factory=list)
    num_frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    first_frame_steps: Optional[list[int]] = None
    video_steps: Optional[list[int]] = None
    guidance_scale: Optional[Number] = None
    video_guidance_scale: Optional[Number] = None
    seed: int = 0
    use_ema: bool = True  # render the EMA weights when the run keeps them


@dataclass
class DistillSection:
    first_frame_steps: list[int]
    video_steps: list[int]
    teacher_first_frame_steps: list[int]
    teacher_video_steps: list[int]
    guidance_scale: Number = 1.0
    video_guidance_scale: Number = 1.0
    stage_grid: Literal["official", "trailing"] = "official"  # the student's (model_core.scheduler), saved with it
    student_rollout_share: Number = 0.0  # samples whose history and start point the student makes (training.distill_task)


@dataclass(kw_only=True)
class TrainingRecipe:
    """What every training task's recipe holds; each task adds its objective (and its own sections)."""

    model: ModelSection
    data: DataSection
    optim: OptimSection
    train: TrainSection
    validation: Optional[ValidationSection] = None


@dataclass(kw_only=True)
class FlowRecipe(TrainingRecipe):
    objective: FlowObjective
    task: Literal["flow"] = "flow"


@dataclass(kw_only=True)
class VAERecipe(TrainingRecipe):
    objective: VAEObjective
    task: Literal["vae"] = "vae"


@dataclass
class DistillBundle:
    out: Optional[str] = None  # set: the last checkpoint (trained first if missing) is copied here as a model folder
    use_ema: bool = True
    model_card: Optional[str] = None
    weights_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # the transformer's stored weights


@dataclass(kw_only=True)
class DistillRecipe(TrainingRecipe):
    distill: DistillSection
    objective: FlowObjective
    bundle: Optional[DistillBundle] = None
    task: Literal["distill"] = "distill"


@dataclass
class WorldSection:
    out: str
    count: int
    seed: int = 0
    heldout: int = 0


@dataclass
class ArchitectureSection:
    family: Literal["miniflux", "sd3"]
    variant: str
    spec: dict
    text: dict
    vae: dict
    transformer: dict


@dataclass
class PhaseSection:
    recipe: str
    overrides: Optional[dict] = None


@dataclass
class PhasesSection:
    vae: PhaseSection
    flow: PhaseSection
    vae_decoder: PhaseSection


@dataclass
class BundleOutput:
    out: Optional[str] = None
    use_ema: bool = True
    model_card: Optional[str] = None
    sampling: Optional[dict] = None


@dataclass
class BundleTrain:
    output_dir: str
    seed: int = 0
    max_steps: Optional[int] = None


@dataclass
class LatentStatistics:
    clips: int


@dataclass
class BundleRecipe:
    world: WorldSection
    architecture: ArchitectureSection
    latent_statistics: LatentStatistics
    phases: PhasesSection
    bundle: BundleOutput
    train: BundleTrain
    task: Literal["bundle"] = "bundle"


RECIPES = {"flow": FlowRecipe, "vae": VAERecipe, "distill": DistillRecipe, "bundle": BundleRecipe}


def check_recipe(config: dict) -> dict:
    """Refuse a recipe with an unknown key, a missing one or a value of the wrong type, in one sentence naming the
    key (and, for an unknown one, the nearest valid name); returns the recipe unchanged."""
    task = config.get("task", "flow")
    if task not in RECIPES:
        raise ValueError(f"task is {task!r}; use one of {', '.join(RECIPES)}")
    check_section(config, RECIPES[task], "")
    return config


def check_section(values, schema, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'the recipe'} must be a section of keys; got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(unknown_key(prefix + str(key), list(fields), prefix))
        check_value(value, type_hints(schema)[key], prefix + key)
    missing = [name for name, f in fields.items() if name not in values and is_required(f)]
    if missing:
        needed = describe(type_hints(schema)[missing[0]])
        raise ValueError(f"the recipe lacks {prefix}{missing[0]}; give it a value ({needed})")


def is_required(spec) -> bool:
    return spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING


@functools.lru_cache(maxsize=None)
def type_hints(schema) -> dict:
    return typing.get_type_hints(schema)


def unknown_key(key: str, valid: list, prefix: str) -> str:
    near = difflib.get_close_matches(key.removeprefix(prefix), valid, n=1, cutoff=0.6)
    if near:
        return f"unknown key {key}; did you mean {prefix}{near[0]}?"
    return f"unknown key {key}; {prefix.rstrip('.') or 'a recipe'} takes {', '.join(valid)}"


def check_value(value, hint, key: str) -> None:
    if not matches(value, hint, key):
        raise ValueError(f"{key} must be {describe(hint)}; got {value!r}")


def matches(value, hint, key: str) -> bool:
    """Whether `value` is of type `hint`; a section (dataclass) inside raises its own sentence."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            check_section(value, hint, key + ".")
            return True
        return False
    if origin is Union:
        if value is None:
            return type(None) in args
        options = [a for a in args if a is not type(None)]
        sections = [a for a in options if dataclasses.is_dataclass(a)]
        if sections and isinstance(value, dict):
            return matches(value, sections[0], key)
        return any(matches(value, a, key) for a in options)
    if origin is Literal:
        return any(value is a or (type(value) is type(a) and value == a) for a in args)
    if origin is list:
        if isinstance(value, list):
            for i, item in enumerate(value):
                check_value(item, args[0], f"{key}[{i}]")
        return isinstance(value, list)
    if hint is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe(hint) -> str:
    """A type hint in words: "a number or null", "one of 'l1', 'l2'"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return "a section of keys"
    if hint == Number:
        return "a number"
    if origin is Union:
        if int in args and float in args:
            return " or ".join(["a number", *(describe(a) for a in args if a not in (int, float))])
        literal = [a for a in args if typing.get_origin(a) is Literal]
        if literal and len(literal) == len(args):
            return describe(Literal[tuple(v for a in literal for v in typing.get_args(a) if v is not False)])
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {type(None): "null", int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a section of keys"}.get(hint, getattr(hint, "__name__", str(hint)))
