"""GPU suite (issue 22): time and peak memory of a 5-s text-to-video at 384p and 768p, per speed and memory option.

Random-weight miniFLUX transformer and causal VAE at the published sizes (benchmarks.random_models), bfloat16,
random prompt embeddings (no text encoder: T5 would only add a constant). Each row builds fresh models, applies its
options, runs an untimed warm-up (two short units, three for `compile` so every history shape is compiled), then
times one 5-s clip (121 frames = 16 latent units; first frame [20, 20, 20] steps, later units [10, 10, 10];
guidance 7 / 5, so every forward is a batch of 2). Per row: sampling and decoding seconds, peak GPU memory (torch's
allocator: the peak allocated and the peak reserved, which is what the device must hold), and the transformer's
achieved TFLOP/s (benchmarks.dit_flops: counted from token counts, with the text tokens the transformer was given,
recorded from its inputs) against a big bfloat16 matmul measured here and the datasheet's dense bf16 figure.
Cache rows record how many of the clip's steps the cache skipped; the weights are random, on which a step cache
skips next to nothing, so those rows time the cache's hooks ("hook overhead only"), not its speed-up.
The official code's side by side (benchmarks.official_side_by_side --published) runs after the suite in the same
GPU run (benchmarks/gpu_run.sh); `--side-by-side FILE` adds its figures to this report and its table.

Rows run most important first, each in a time box (`Row.box_s`: building the models, warm-up, the timed clip and
its decoding), under one budget (--budget-s, counted from start; 300 s by default, so the suite with its start-up
stays within 6 minutes): `planned_rows` starts a row only while its whole box fits in what is left and stops it at
its box's end (the sampler checks every step, and decoding does not start after it); a row that cannot start is
listed as "not reached", never dropped. The JSON (and the markdown table) is rewritten after every row, so a run
cut short keeps what it measured; a failing row records its error and the suite goes on. Options this build does
not have are refused as "not available in this build". Nothing is estimated.

    python -m benchmarks.gpu_suite --out results/       # on a CUDA GPU: at most --budget-s plus start-up
    python -m benchmarks.gpu_suite --smoke --out /tmp/s # the same code path on the CPU with tiny models
    python -m benchmarks.gpu_suite --out results/ --side-by-side results/official_side_by_side.json
"""
import argparse
import gc
import importlib.util
import json
import os
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
from model_core.speed import compile_blocks, fuse_projections  # noqa: E402

GIB = 2**30
SIZES = {"384p": (384, 640), "768p": (768, 1280)}
SMOKE_SIZES = {"384p": (64, 64), "768p": (64, 128)}
UNITS, SMOKE_UNITS = 16, 2  # 5 s at 24 fps = 121 frames = 16 latent units
SMOKE_STEPS = ((1, 1, 1), (1, 1, 1))
DATASHEET_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4}  # dense, no sparsity
BUDGET_S, SMOKE_BUDGET_S = 300.0, 3600.0  # the suite's rows, start-up aside; the smoke run's rows trace compile
BOX_S = {"384p": 100.0, "768p": 200.0}  # a row's time box on the GPU, compile rows COMPILE_BOX_S more
COMPILE_BOX_S = 60.0  # tracing and compiling the blocks for the warm-up's history shapes
SMOKE_BOX_S = 150.0  # a tiny-model row on the CPU (compile rows trace the blocks for every history shape)
CACHE_SETTINGS = (("first-block", 0.05), ("first-block", 0.1), ("mag", 0.05), ("taylorseer", 0.05))
ATTENTION_BACKENDS = ("flex", "flash", "flash_varlen", "sage", "sage_varlen")


@dataclass
class Row:
    """One measurement: a resolution and the options applied to fresh models before the run."""

    name: str
    size: str
    fp8: bool = False
    compile: bool = False
    offload: str = "none"
    cache: tuple = None  # (name, threshold)
    attention_backend: str = None
    per_group_calls: bool = False  # one attention call per causal group (the previous release) instead of the plan

    def box_s(self, smoke: bool) -> float:
        """Seconds this row may take in all (see the module docstring)."""
        return SMOKE_BOX_S if smoke else BOX_S[self.size] + (COMPILE_BOX_S if self.compile else 0.0)


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
    """Most important first (issue 32): the eager baseline, the best setting, compile alone, 768p with the best
    setting, then what each option does alone and what makes 768p small."""
    first_block = CACHE_SETTINGS[0]
    best = dict(fp8=True, compile=True, cache=first_block)
    rows = [Row("baseline", "384p"), Row("fp8 + compile + cache", "384p", **best), Row("compile", "384p", compile=True),
            Row("fp8 + compile + cache", "768p", **best), Row("baseline", "768p"), Row("quantize=fp8", "384p", fp8=True),
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
        if importlib.util.find_spec("model_core.step_cache") is None:
            raise Unavailable("cache: not available in this build")
        from model_core.step_cache import CACHE_MODES, apply_step_cache

        if name not in CACHE_MODES:
            raise Unavailable(f"cache={name}: not available in this build (it has {', '.join(CACHE_MODES)})")
        apply_step_cache(transformer, name, threshold)
        settings["cache"], settings["cache_threshold"] = name, threshold
    if row.fp8:
        if device.type != "cuda":
            raise Unavailable("quantize=fp8 is timed on a CUDA GPU only")
        settings["fp8"] = apply_fp8(transformer, transformer.dtype, device, row.offload)
    if row.compile:
        compile_blocks(transformer, compile_backend)  # the blocks, and flex attention's calls
        settings["compile"] = f"repeated blocks, dynamic shapes, {compile_backend}"
    if row.offload != "none":
        if device.type != "cuda":
            raise Unavailable(f"offload={row.offload} moves weights between the CPU and a GPU; there is no GPU")
        apply_offload(row.offload, transformer, vae, device)
        settings["offload"] = row.offload
    return settings


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
    if importlib.util.find_spec("model_core.step_cache") is None:
        return []
    from model_core.step_cache import step_cache_state

    state = step_cache_state(transformer)
    return [] if state is None else list(state.decisions)


def skipped_share(decisions: list) -> dict:
    """What a cache row records of the timed clip's decisions."""
    skipped = sum(decisions)
    return {"cache_steps": len(decisions), "cache_skipped_steps": skipped,
            "cache_skip_share": round(skipped / len(decisions), 3) if decisions else None}


class TextTokens:
    """Records the text tokens per row of every forward of `transformer` (what its FLOPs are counted with)."""

    def __init__(self, transformer):
        self.seen = set()
        self.hook = transformer.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.seen.add(kwargs["encoder_hidden_states"].shape[1])

    def count(self) -> int:
        """The one text length the forwards were given."""
        if len(self.seen) != 1:
            raise RuntimeError(f"the forwards were given {sorted(self.seen)} text tokens; expected one length")
        return next(iter(self.seen))


class Suite:
    """Runs rows under one time budget and rewrites the report after each."""

    def __init__(self, out: Path, smoke: bool, budget_s: float, rows: list):
        self.out, self.smoke, self.rows, self.budget_s = out, smoke, rows, budget_s
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

    def clip(self, size: str, warm_up_units: int = 0) -> Clip:
        height, width = (SMOKE_SIZES if self.smoke else SIZES)[size]
        steps = SMOKE_STEPS if self.smoke else ((20, 20, 20), (10, 10, 10))
        if warm_up_units:
            return Clip(height, width, warm_up_units, (1, 1, 1), (1, 1, 1))
        return Clip(height, width, SMOKE_UNITS if self.smoke else UNITS, *steps)

    def run(self):
        self.report["matmul_tflops"] = matmul_tflops(self.device, self.smoke)
        self.report["datasheet_bf16_tflops"] = datasheet_tflops(self.device)
        self.write()
        left = self.budget_s - (time.monotonic() - self.started)
        for row, result in planned_rows(self.rows, left, self.smoke, self.measure):
            self.record(row, result)
        self.report["total_s"] = time.monotonic() - self.started
        self.write()

    def measure(self, row: Row, deadline: float) -> dict:
        from model_core.transformers import attention_plan

        transformer, vae, planned = None, None, dict(attention_plan.CALL_OVERHEAD_MACS)
        try:
            transformer = build_transformer(self.transformer_config, self.device, self.dtype)
            fuse_projections(transformer)  # q/k/v fused, as pipelines load it
            vae = build_vae(self.vae_config, self.device, self.dtype)
            settings = apply_row_options(row, transformer, vae, self.device, "eager" if self.smoke else "inductor")
            clip = self.clip(row.size)
            started = time.perf_counter()
            warm_up = self.clip(row.size, warm_up_units=2 if self.smoke else 3 if row.compile else 2)
            text_to_video(transformer, vae, warm_up, self.text, self.negative, self.device, decode=False, deadline=deadline)
            warm_up_s = time.perf_counter() - started
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            decided, text_tokens = len(cache_decisions(transformer)), TextTokens(transformer)
            result = text_to_video(transformer, vae, clip, self.text, self.negative, self.device, deadline=deadline)
            text_tokens.hook.remove()
            flops = generation_flops(self.transformer_config, clip.height, clip.width, clip.num_units,
                                     clip.first_frame_steps, clip.video_steps, guided=True,
                                     text_tokens=text_tokens.count())
            achieved = flops / result["sampling_s"] / 1e12
            datasheet = self.report["datasheet_bf16_tflops"]
            return {
                "status": "ok", "settings": settings, "warm_up_s": round(warm_up_s, 2),
                "sampling_s": round(result["sampling_s"], 2), "decode_s": round(result["decode_s"], 2),
                "total_s": round(result["sampling_s"] + result["decode_s"], 2), **peak_vram_gib(self.device),
                "text_tokens": text_tokens.count(), "dit_tflop": _significant(flops / 1e12),
                "dit_tflops": _significant(achieved), "of_matmul": round(achieved / self.report["matmul_tflops"], 3),
                "of_datasheet": round(achieved / datasheet, 3) if datasheet else None,
                **(skipped_share(cache_decisions(transformer)[decided:]) if row.cache is not None else {}),
                "finite": bool(torch.isfinite(result["latents"]).all()),
            }
        except Unavailable as reason:
            return {"status": "unavailable", "note": str(reason)}
        except TimeBudgetReached as reason:
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

    def record(self, row: Row, result: dict):
        clip = self.clip(row.size)
        entry = {"row": row.name, "size": row.size, "height": clip.height, "width": clip.width,
                 "units": clip.num_units, **result}
        self.report["rows"].append(entry)
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


def add_side_by_side(out: Path, side_by_side: Path) -> dict:
    """The suite's report in `out` with the official side by side's figures (its JSON, or why there are none) added,
    rewritten with both tables."""
    report_path = out / "gpu_suite.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"rows": [], "note": "the suite wrote no report"}
    report["official_side_by_side"] = (json.loads(side_by_side.read_text()) if side_by_side.exists() else
                                       {"status": "not run", "note": f"{side_by_side} was not written"})
    write_report(out, report)
    return report


def row_note(row: dict, random_weights: bool) -> str:
    note = ", ".join(f"{k}={v}" for k, v in row["settings"].items()) + ("" if row["finite"] else "; non-finite latents")
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
    for row in report["rows"]:
        if row["status"] == "ok":
            lines.append(f"| {row['size']} | {row['row']} | {row['total_s']} | {row['sampling_s']} | {row['decode_s']} | "
                         f"{row['peak_vram_allocated_gib']} / {row['peak_vram_reserved_gib']} | {row['text_tokens']} | "
                         f"{row['dit_tflops']} | {row['of_matmul']} | {row_note(row, random_weights)} |")
        else:
            lines.append(f"| {row['size']} | {row['row']} | - | - | - | - | - | - | - | {row['status']}: {row['note']} |")
    if "official_side_by_side" in report:
        lines += ["", *side_by_side_markdown(report["official_side_by_side"])]
    return "\n".join(lines) + "\n"


def side_by_side_markdown(result: dict) -> list:
    """The official side by side's table (benchmarks.official_side_by_side --published, the same GPU run)."""
    lines = ["Official code side by side in the same run (benchmarks.official_side_by_side --published: sampler and "
             "decode, the same random weights in the official layout on both sides):", "",
             "| size | units | steps first frame / video | ours s | official s | ours / official | "
             "peak GiB ours / official | max latent difference |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    if "ours_s" not in result:
        return lines + [f"| - | - | - | - | - | - | - | {result.get('status', 'not finished')}: "
                        f"{result.get('note', 'no timings recorded')} |"]
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
    parser.add_argument("--side-by-side", type=Path, metavar="FILE",
                        help="add official_side_by_side.json's figures to the report in --out (nothing is run)")
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error("--out is required when $OUT is not set")
    if args.side_by_side is not None:
        return add_side_by_side(args.out, args.side_by_side)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("the suite times a CUDA GPU; none is visible here (use --smoke to check the code path on the CPU)")
    budget = args.budget_s if args.budget_s is not None else SMOKE_BUDGET_S if args.smoke else BUDGET_S
    suite = Suite(args.out, args.smoke, budget, suite_rows())
    suite.run()
    return suite.report


if __name__ == "__main__":
    main()
