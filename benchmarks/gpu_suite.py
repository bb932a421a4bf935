"""GPU suite (issue 22): time and peak memory of a 5-s text-to-video at 384p and 768p, per speed and memory option.

Random-weight miniFLUX transformer and causal VAE at the published sizes (benchmarks.random_models), bfloat16,
random prompt embeddings (no text encoder: T5 would only add a constant), the q/k/v projections and adaLN
modulations fused as pipelines load them. Each row builds fresh models, applies its options as pipelines apply them
(compile: model_core.speed.compile_forward at the row's level, False / True / "max", and the history padded to the
clip's shape buckets, speed.uses_shape_buckets), runs an untimed warm-up, then times one 5-s clip (121 frames = 16
latent units; first frame [20, 20, 20] steps, later units [10, 10, 10]; guidance 7 / 5, so every forward is a batch
of 2). The warm-up of an eager row is two short units; that of a compiled row is the clip's own units at one step a
stage (two under "max", whose CUDA graph of a shape is recorded at its second call), so every input shape of the
clip, each bucket's included, is compiled before the timing: the row records the shapes the warm-up compiled and how
many of the timed clip's were new (none, unless a compile happened inside the timing). Per row: sampling and
decoding seconds, peak GPU memory (torch's allocator: the peak allocated and the peak reserved, which is what the
device must hold), and the transformer's achieved TFLOP/s (benchmarks.dit_flops: counted from token counts, with the
text tokens the transformer was given, recorded from its inputs; the clip's own tokens, not the buckets' padding)
against a big bfloat16 matmul measured here and the datasheet's dense bf16 figure. Cache rows record how many of the clip's steps the cache skipped; the weights are
random, on which a step cache skips next to nothing, so those rows time the cache's hooks ("hook overhead only"),
not its speed-up. The official code's side by side is a row of its own (benchmarks.official_side_by_side --published
in a child process, stopped at its box's end; our transformer fused as pipelines load it, the same random weights in
the official layout on the other side, [10, 10, 10] / [5, 5, 5] steps to fit its box); without the authors' code in
--official (default .official/), the row says "not run: official code not found".

Rows run most important first, each in a time box (`Row.box_s`: building the models, warm-up, the timed clip and its
decoding), under one budget (--budget-s, counted from start; BUDGET_S = 310 s by default, so the suite with its
start-up stays within 6 minutes, see benchmarks/gpu_run.sh): `planned_rows` starts a row only while its whole box
fits in what is left and stops it at its box's end (the sampler checks every step, and decoding does not start after
it); a row that cannot start is listed as "not reached", never dropped. Every row is listed from the start ("not
reached" until it runs) and the JSON (and the markdown table) is rewritten after every row, so a run cut short keeps
what it measured; a failing row records its error and the suite goes on. Options this build does not have are
refused as "not available in this build". Nothing is estimated.

    python -m benchmarks.gpu_suite --out results/       # on a CUDA GPU: at most --budget-s plus start-up
    python -m benchmarks.gpu_suite --smoke --out /tmp/s # the same code path on the CPU with tiny models
"""
import argparse
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.dit_flops import generation_flops  # noqa: E402
from benchmarks.random_models import (  # noqa: E402
    Clip, TimeBudgetReached, build_transformer, build_vae, model_configs, random_prompt, synchronize, text_to_video,
)
from model_core.memory import apply_fp8  # noqa: E402
from model_core.speed import check_compile, compile_forward, fuse_projections, managed_by_hooks  # noqa: E402
from model_core.step_cache import CACHE_MODES, apply_step_cache, step_cache_state  # noqa: E402

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]
SIZES = {"384p": (384, 640), "768p": (768, 1280)}
SMOKE_SIZES = {"384p": (64, 64), "768p": (64, 128)}
UNITS, SMOKE_UNITS = 16, 5  # 5 s at 24 fps = 121 frames = 16 latent units; the smoke run: enough to pad to buckets
SMOKE_STEPS = ((1, 1, 1), (1, 1, 1))
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4}  # dense, no sparsity
BUDGET_S, SMOKE_BUDGET_S = 310.0, 3600.0  # the suite's rows, start-up aside; the smoke run's rows trace compile
BOX_S = {"384p": 90.0, "768p": 180.0}  # a row's time box on the GPU, compile rows COMPILE_BOX_S more
COMPILE_BOX_S = 110.0  # compiling the whole forward for each of the clip's input shapes (15 at 384p) in the warm-up
SIDE_BY_SIDE_BOX_S = 150.0  # the official side by side's child process: both sides built, warmed up and timed
SMOKE_BOX_S = 150.0  # a tiny-model row on the CPU (compile rows trace the forward for every input shape)
SIDE_BY_SIDE_STEPS, SMOKE_SIDE_BY_SIDE_STEPS = ((10, 10, 10), (5, 5, 5)), ((1, 1, 1), (1, 1, 1))
BEST = "best: fp8 + compile=max (CUDA graphs)"  # no step cache: see suite_rows
CACHE_SETTINGS = (("first-block", 0.05), ("first-block", 0.1), ("mag", 0.05), ("taylorseer", 0.05))
ATTENTION_BACKENDS = ("flex", "flash", "flash_varlen", "sage", "sage_varlen")


@dataclass
class Row:
    """One measurement: a resolution and the options applied to fresh models before the run."""

    name: str
    size: str
    fp8: bool = False
    compile: object = False  # the level: False, True or "max" (model_core.speed.compile_forward)
    offload: str = "none"
    cache: tuple = None  # (name, threshold)
    attention_backend: str = None
    per_group_calls: bool = False  # one attention call per causal group (the previous release) instead of the plan
    side_by_side: bool = False  # the official code against ours (benchmarks.official_side_by_side), nothing else

    def box_s(self, smoke: bool) -> float:
        """Seconds this row may take in all (see the module docstring)."""
        if smoke:
            return SMOKE_BOX_S
        if self.side_by_side:
            return SIDE_BY_SIDE_BOX_S
        return BOX_S[self.size] + (COMPILE_BOX_S if self.compile else 0.0)


def planned_rows(rows: list, budget_s: float, smoke: bool, measure, clock=time.monotonic):
    """Yield (row, result) for `rows` in priority order within `budget_s` seconds from now: a row is measured,
    `measure(row, deadline)`, only when its whole time box fits in what is left, with the deadline at its box's end;
    a row whose box does not fit is "not reached" (a later, shorter one may still run)."""
    end = clock() + budget_s
    for row in rows:
        started = clock()
        left, box = end - started, row.box_s(smoke)
        if box > left:
            yield row, {"status": "not reached", "note": f"its {box:.0f} s time box did not fit in the {left:.0f} s left"}
            continue
        result = measure(row, started + box)
        yield row, {**result, "row_s": round(clock() - started, 1)}


def suite_rows() -> list:
    """Most important first (issue 32): the eager baseline, the best setting, each compile level alone, the official
    side by side, 768p with the best setting, then what each option does alone and what makes 768p small.
    The best setting is fp8 compute and compile "max" without a step cache: with a cache the forward compiles with
    graph breaks and without CUDA graphs (speed.compile_forward), and on random weights a cache skips next to no
    step, so it would time the cache's cost and not its gain (the fp8 + compile + cache row times that)."""
    first_block = CACHE_SETTINGS[0]
    best = dict(fp8=True, compile="max")
    rows = [Row("baseline", "384p"), Row(BEST, "384p", **best), Row("compile=True", "384p", compile=True),
            Row("compile=max (CUDA graphs)", "384p", compile="max"),
            Row("official side by side", "384p", side_by_side=True),
            Row(BEST, "768p", **best), Row("baseline", "768p"), Row("quantize=fp8", "384p", fp8=True),
            Row(f"fp8 + compile + {_cache_name(first_block)}: graph breaks, no CUDA graphs", "384p", fp8=True,
                compile=True, cache=first_block),
            Row(_cache_name(first_block), "384p", cache=first_block),
            Row("one attention call per causal group", "384p", per_group_calls=True)]
    rows += [Row(f"attention={backend}", "384p", attention_backend=backend) for backend in ATTENTION_BACKENDS]
    rows += [Row("offload=model", "384p", offload="model"), Row("offload=group", "384p", offload="group"),
             Row("offload=model + fp8", "768p", offload="model", fp8=True)]
    rows += [Row(_cache_name(setting), "384p", cache=setting) for setting in CACHE_SETTINGS[1:]]
    rows += [Row("offload=sequential", "384p", offload="sequential")]
    return rows


def _cache_name(setting) -> str:
    return f"cache={setting[0]} ({setting[1]})"


class Unavailable(Exception):
    """This option cannot run here; the message says why."""


def apply_row_options(row: Row, transformer, vae, device: torch.device, compile_backend: str = "inductor") -> dict:
    """Apply the row's options to fresh models (weights still on `device`); returns the settings really used.
    `compile_backend` is torch.compile's backend (the smoke run traces with "eager" instead of generating code)."""
    settings = {}
    if row.per_group_calls:
        from model_core.transformers import attention_plan

        attention_plan.CALL_OVERHEAD_MACS[device.type] = 0.0  # measure() puts the plan's figure back
        settings["attention_calls"] = "one per causal group"
    if row.attention_backend is not None:
        from model_core.transformers.attention_backends import check_attention_backend

        try:
            name = check_attention_backend(row.attention_backend, device, transformer.dtype)
        except ValueError as refusal:
            raise Unavailable(f"attention_backend={row.attention_backend}: {refusal}") from None
        transformer.set_attention_backend(name)
        settings["attention_backend"] = name
    if row.cache is not None:
        name, threshold = row.cache
        if name not in CACHE_MODES:
            raise Unavailable(f"cache={name}: not available in this build (it has {', '.join(CACHE_MODES)})")
        apply_step_cache(transformer, name, threshold)
        settings["cache"], settings["cache_threshold"] = name, threshold
    if row.fp8:
        if device.type != "cuda":
            raise Unavailable("quantize=fp8 is timed on a CUDA GPU only")
        settings["fp8"] = apply_fp8(transformer, transformer.dtype, device, row.offload)
    if row.offload != "none":
        if device.type != "cuda":
            raise Unavailable(f"offload={row.offload} moves weights between the CPU and a GPU; there is no GPU")
        apply_offload(row.offload, transformer, vae, device)
        settings["offload"] = row.offload
    if row.compile:  # last, as pipelines do: compile_forward reads the hooks set before it
        try:
            check_compile(row.compile, device)
        except ValueError as refusal:
            raise Unavailable(str(refusal)) from None
        compile_forward(transformer, row.compile, compile_backend)
        settings["compile"] = f"{row.compile}: {compiled_as(transformer, row.compile)}, {compile_backend}"
    return settings


def compiled_as(transformer, level) -> str:
    """How speed.compile_forward runs the forward at `level` with the hooks the transformer has."""
    if managed_by_hooks(transformer) or step_cache_state(transformer) is not None:
        return "whole forward, graph breaks allowed, no CUDA graphs (hooks in the forward)"
    return "whole forward, one graph per shape" + (", a CUDA graph per shape" if level == "max" else "")


def apply_offload(offload: str, transformer, vae, device: torch.device):
    """The pipeline's offload modes on bare models: `model` moves each whole model to the GPU while it runs,
    `group` one block at a time, `sequential` one layer at a time (the VAE per layer in both)."""
    from accelerate import cpu_offload_with_hook
    from diffusers.hooks import apply_group_offloading

    transformer.to("cpu")
    vae.to("cpu")
    if offload == "model":
        _, hook = cpu_offload_with_hook(transformer, device)
        cpu_offload_with_hook(vae, device, prev_module_hook=hook)
        return
    level = "leaf_level" if offload == "sequential" else "block_level"
    blocks = {"num_blocks_per_group": 1} if offload == "group" else {}
    apply_group_offloading(transformer, onload_device=device, offload_type=level, **blocks)
    apply_group_offloading(vae, onload_device=device, offload_type="leaf_level")


def matmul_tflops(device: torch.device, smoke: bool) -> float:
    """Achieved TFLOP/s of a big square bfloat16 matmul (float32 on the CPU): the practical ceiling here."""
    n, dtype = (256, torch.float32) if smoke else (8192, torch.bfloat16)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=generator, device=device).to(dtype)
    b = torch.randn(n, n, generator=generator, device=device).to(dtype)
    repeats = 3 if smoke else 50
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12


def _significant(value: float) -> float:
    return float(f"{value:.4g}")


def datasheet_tflops(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in DATASHEET_BF16_TFLOPS.items() if key in name), None)


def peak_vram_gib(device: torch.device) -> dict:
    """torch's allocator peaks since the last reset: allocated (tensors) and reserved (what the device holds)."""
    if device.type != "cuda":
        return {"peak_vram_allocated_gib": None, "peak_vram_reserved_gib": None}
    return {"peak_vram_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2),
            "peak_vram_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 2)}


def cache_decisions(transformer) -> list:
    """The step cache's skip (True) / compute decisions so far, one per step; [] without a cache."""
    state = step_cache_state(transformer)
    return [] if state is None else list(state.decisions)


def skipped_share(decisions: list) -> dict:
    """What a cache row records of the timed clip's decisions."""
    skipped = sum(decisions)
    return {"cache_steps": len(decisions), "cache_skipped_steps": skipped,
            "cache_skip_share": round(skipped / len(decisions), 3) if decisions else None}


class ForwardInputs:
    """Records what the forwards of `transformer` are given: the text tokens per row (what its FLOPs are counted
    with) and the input shapes (each one a compile of a compiled forward: clip shapes, and whether padded)."""

    def __init__(self, transformer):
        self.text_tokens, self.shapes = set(), set()
        self.hook = transformer.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.text_tokens.add(kwargs["encoder_hidden_states"].shape[1])
        clips = tuple(tuple(clip.shape) for clip in kwargs["sample"][0])
        self.shapes.add((clips, kwargs.get("valid_frames") is not None))

    def text_token_count(self) -> int:
        """The one text length the forwards were given."""
        if len(self.text_tokens) != 1:
            raise RuntimeError(f"the forwards were given {sorted(self.text_tokens)} text tokens; expected one length")
        return next(iter(self.text_tokens))


def side_by_side_command(official: Path, out: Path, clip: Clip, smoke: bool) -> list:
    """benchmarks.official_side_by_side on `clip`'s size and units: published sizes in bfloat16 on the GPU, tiny
    models in float32 with one timed run per side in the smoke run."""
    first_frame, video = SMOKE_SIDE_BY_SIDE_STEPS if smoke else SIDE_BY_SIDE_STEPS
    mode = ["--repeats", "1"] if smoke else ["--published"]
    return [sys.executable, "-m", "benchmarks.official_side_by_side", *mode, "--official", str(official),
            "--out", str(out), "--height", str(clip.height), "--width", str(clip.width), "--units", str(clip.num_units),
            "--first-frame-steps", *map(str, first_frame), "--video-steps", *map(str, video)]


def official_side_by_side(command: list, official: Path, out: Path, deadline: float) -> dict:
    """The side by side's row: `command` in a child process (its GPU memory its own, freed when it ends), stopped at
    `deadline`; its figures (those it wrote before the deadline), or why there are none. Its log: `out`/
    official_side_by_side.log."""
    if not (official / "pyramid_dit").is_dir():
        return {"status": "not run", "note": f"official code not found (no {official}/pyramid_dit)"}
    written = out / "official_side_by_side.json"
    written.unlink(missing_ok=True)
    stopped = None
    with open(out / "official_side_by_side.log", "w") as log:
        try:
            subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True,
                           timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            stopped = "its time box ended"
        except subprocess.CalledProcessError as failed:
            return {"status": "error", "note": f"the side by side exited with status {failed.returncode} "
                                               "(official_side_by_side.log)"}
    if not written.exists() or "ours_s" not in json.loads(written.read_text()):
        return {"status": "stopped", "note": f"{stopped or 'it ended'} before it timed both sides"}
    figures = json.loads(written.read_text())
    if stopped and "max_latent_difference" not in figures:
        figures["max_latent_difference"] = f"not reached ({stopped})"
    return {"status": "ok", "side_by_side": figures}


class Suite:
    """Runs rows under one time budget and rewrites the report after each."""

    def __init__(self, out: Path, smoke: bool, budget_s: float, rows: list, official: Path = ROOT / ".official"):
        self.out, self.smoke, self.rows, self.budget_s = out, smoke, rows, budget_s
        self.official = Path(official).resolve()  # the side by side's child runs in the repository root
        self.started = time.monotonic()
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.transformer_config, self.vae_config = model_configs(tiny=smoke)
        self.text = random_prompt(self.transformer_config, valid_tokens=24, seed=1, device=self.device)
        self.negative = random_prompt(self.transformer_config, valid_tokens=40, seed=2, device=self.device)
        self.report = {"device": self._describe_device(), "smoke": smoke, "budget_s": budget_s, "weights": "random",
                       "rows": []}

    def _describe_device(self) -> dict:
        versions = {"torch": torch.__version__}
        for package in ("diffusers", "torchao", "accelerate"):
            if importlib.util.find_spec(package) is not None:
                versions[package] = __import__(package).__version__
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"name": name, "versions": versions}

    def clip(self, size: str) -> Clip:
        height, width = (SMOKE_SIZES if self.smoke else SIZES)[size]
        steps = SMOKE_STEPS if self.smoke else ((20, 20, 20), (10, 10, 10))
        return Clip(height, width, SMOKE_UNITS if self.smoke else UNITS, *steps)

    def warm_up_clip(self, row: Row) -> Clip:
        """Eager: two units at one step a stage. Compiled: the clip's own units (so its shape buckets and every input
        shape), one step a stage, two under "max" (a shape's CUDA graph is recorded at its second call)."""
        clip = self.clip(row.size)
        steps = (2, 2, 2) if row.compile == "max" else (1, 1, 1)
        return Clip(clip.height, clip.width, clip.num_units if row.compile else 2, steps, steps)

    def run(self):
        self.report["rows"] = [self.entry(row, {"status": "not reached", "note": "the suite ended before this row"})
                               for row in self.rows]
        self.report["matmul_tflops"] = matmul_tflops(self.device, self.smoke)
        self.report["datasheet_bf16_tflops"] = datasheet_tflops(self.device)
        self.write()
        left = self.budget_s - (time.monotonic() - self.started)
        for index, (row, result) in enumerate(planned_rows(self.rows, left, self.smoke, self.measure)):
            self.record(index, row, result)
        self.report["total_s"] = time.monotonic() - self.started
        self.write()

    def measure(self, row: Row, deadline: float) -> dict:
        if row.side_by_side:
            command = side_by_side_command(self.official, self.out, self.clip(row.size), self.smoke)
            return official_side_by_side(command, self.official, self.out, deadline)
        from model_core.transformers import attention_plan

        transformer, vae, planned = None, None, dict(attention_plan.CALL_OVERHEAD_MACS)
        warm_up_inputs, started, timing = None, time.perf_counter(), False
        try:
            transformer = build_transformer(self.transformer_config, self.device, self.dtype)
            fuse_projections(transformer)  # q/k/v and modulations fused, as pipelines load it
            vae = build_vae(self.vae_config, self.device, self.dtype)
            settings = apply_row_options(row, transformer, vae, self.device, "eager" if self.smoke else "inductor")
            clip, level = self.clip(row.size), row.compile
            started, warm_up_inputs = time.perf_counter(), ForwardInputs(transformer)
            text_to_video(transformer, vae, self.warm_up_clip(row), self.text, self.negative, self.device, decode=False,
                          deadline=deadline, compile=level)
            warm_up_inputs.hook.remove()
            warm_up_s, timing = time.perf_counter() - started, True
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            decided, inputs = len(cache_decisions(transformer)), ForwardInputs(transformer)
            result = text_to_video(transformer, vae, clip, self.text, self.negative, self.device, deadline=deadline,
                                   compile=level)
            inputs.hook.remove()
            text_tokens = inputs.text_token_count()
            flops = generation_flops(self.transformer_config, clip.height, clip.width, clip.num_units,
                                     clip.first_frame_steps, clip.video_steps, guided=True, text_tokens=text_tokens)
            achieved = flops / result["sampling_s"] / 1e12
            datasheet = self.report["datasheet_bf16_tflops"]
            return {
                "status": "ok", "settings": settings, "warm_up_s": round(warm_up_s, 2),
                "warm_up_shapes": len(warm_up_inputs.shapes), "input_shapes": len(inputs.shapes),
                "shapes_new_after_warm_up": len(inputs.shapes - warm_up_inputs.shapes),
                "sampling_s": round(result["sampling_s"], 2), "decode_s": round(result["decode_s"], 2),
                "total_s": round(result["sampling_s"] + result["decode_s"], 2), **peak_vram_gib(self.device),
                "text_tokens": text_tokens, "dit_tflop": _significant(flops / 1e12),
                "dit_tflops": _significant(achieved), "of_matmul": round(achieved / self.report["matmul_tflops"], 3),
                "of_datasheet": round(achieved / datasheet, 3) if datasheet else None,
                **(skipped_share(cache_decisions(transformer)[decided:]) if row.cache is not None else {}),
                "finite": bool(torch.isfinite(result["latents"]).all()),
            }
        except Unavailable as reason:
            return {"status": "unavailable", "note": str(reason)}
        except TimeBudgetReached as reason:
            if warm_up_inputs is not None and not timing:
                reason = (f"{reason} in the warm-up, after {len(warm_up_inputs.shapes)} input shapes in "
                          f"{time.perf_counter() - started:.0f} s")
            return {"status": "stopped", "note": str(reason)}
        except Exception as error:  # a failing row is a result: record it and go on
            return {"status": "error", "note": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(limit=4)}
        finally:
            attention_plan.CALL_OVERHEAD_MACS.clear()
            attention_plan.CALL_OVERHEAD_MACS.update(planned)
            del transformer, vae
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if row.compile:
                torch._dynamo.reset()

    def entry(self, row: Row, result: dict) -> dict:
        clip = self.clip(row.size)
        return {"row": row.name, "size": row.size, "height": clip.height, "width": clip.width, "units": clip.num_units,
                **result}

    def record(self, index: int, row: Row, result: dict):
        entry = self.report["rows"][index] = self.entry(row, result)
        print(json.dumps({k: v for k, v in entry.items() if k != "traceback"}), flush=True)
        self.write()

    def write(self):
        write_report(self.out, self.report)


def write_report(out: Path, report: dict):
    """gpu_suite.json and its markdown table gpu_suite.md in `out`, each written to a temporary name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_suite.json", json.dumps(report, indent=1)), ("gpu_suite.md", markdown(report))):
        temporary = out / f".{name}.tmp"
        temporary.write_text(text)
        os.replace(temporary, out / name)


def row_note(row: dict, random_weights: bool) -> str:
    note = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) + ("" if row["finite"] else "; non-finite latents")
    if "compile" in row["settings"]:
        note += (f"; {row['warm_up_shapes']} input shapes compiled in the warm-up, {row['shapes_new_after_warm_up']} "
                 "new in the timing")
    if "cache_steps" in row:
        note += f"; skipped {row['cache_skipped_steps']} of {row['cache_steps']} steps"
        if random_weights:
            note += "; hook overhead only (random weights)"
    return note


def markdown(report: dict) -> str:
    """The RESULTS.md section of a report."""
    device = report.get("device", {"name": "unknown", "versions": {}})
    random_weights = report.get("weights") == "random"
    lines = [f"Device: {device['name']}; " + ", ".join(f"{k} {v}" for k, v in device["versions"].items()) + ".",
             f"bf16 matmul ceiling measured here: {report.get('matmul_tflops', 0):.0f} TFLOP/s; "
             f"datasheet dense bf16: {report.get('datasheet_bf16_tflops') or 'unknown'} TFLOP/s. "
             f"Weights: {report.get('weights', 'unknown')}; DiT TFLOP/s counted with the text tokens per row the "
             "transformer was given (text tok).", "",
             "| size | row | total s | sampling s | decode s | peak VRAM GiB allocated / reserved | text tok | "
             "DiT TFLOP/s | of matmul | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    side_by_side = []
    for row in report["rows"]:
        if row["status"] == "ok" and "side_by_side" in row:
            figures = row["side_by_side"]
            side_by_side = side_by_side_markdown(figures)
            lines.append(f"| {row['size']} | {row['row']} | {figures['ours_s']} | - | - | - | - | - | - | official "
                         f"{figures['official_s']} s, ours / official {figures['time_ratio']}: the table below |")
        elif row["status"] == "ok":
            lines.append(f"| {row['size']} | {row['row']} | {row['total_s']} | {row['sampling_s']} | {row['decode_s']} | "
                         f"{row['peak_vram_allocated_gib']} / {row['peak_vram_reserved_gib']} | {row['text_tokens']} | "
                         f"{row['dit_tflops']} | {row['of_matmul']} | {row_note(row, random_weights)} |")
        else:
            lines.append(f"| {row['size']} | {row['row']} | - | - | - | - | - | - | - | {row['status']}: {row['note']} |")
    if side_by_side:
        lines += ["", *side_by_side]
    return "\n".join(lines) + "\n"


def side_by_side_markdown(result: dict) -> list:
    """The official side by side row's table (benchmarks.official_side_by_side --published)."""
    lines = ["Official code side by side in the same run (benchmarks.official_side_by_side --published: sampler and "
             "decode, the same random weights in the official layout on both sides, ours fused as pipelines load it):",
             "", "| size | units | steps first frame / video | ours s | official s | ours / official | "
             "peak GiB ours / official | max latent difference |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    steps = f"{result['first_frame_steps']} / {result['video_steps']}"
    return lines + [f"| {result['height']}x{result['width']} | {result['units']} | {steps} | {result['ours_s']} | "
                    f"{result['official_s']} | {result['time_ratio']} | {result['ours_peak_gib']} / "
                    f"{result['official_peak_gib']} | {result.get('max_latent_difference', 'not reached')} |"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                        help="folder for gpu_suite.json and gpu_suite.md (default: $OUT)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the code path")
    parser.add_argument("--budget-s", type=float, help=f"wall-clock budget of the rows from start (default {BUDGET_S:.0f}, "
                                                         f"smoke {SMOKE_BUDGET_S:.0f})")
    parser.add_argument("--official", type=Path, default=ROOT / ".official",
                        help="checkout of the official code for the side-by-side row (default: .official/)")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is required when $OUT is not set")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("the suite times a CUDA GPU; none is visible here (use --smoke to check the code path on the CPU)")
    budget = args.budget_s if args.budget_s is not None else SMOKE_BUDGET_S if args.smoke else BUDGET_S
    suite = Suite(args.out, args.smoke, budget, suite_rows(), args.official)
    suite.run()
    return suite.report


if __name__ == "__main__":
    main()
