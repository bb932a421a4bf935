"""Training on 10 M annotation lines costs what it costs on 1,000: start-up, per-step sampling and memory.

    python -m benchmarks.data_scale [--entries 10000000] [--steps 12] [--work outputs/data_scale] [--data-only]
    python -m benchmarks.data_scale --caption-bytes

The bundled model's flow recipe (`tiny_shapes_flow.yaml`, global batch 8, one process, precomputed features)
runs on two jsonl files whose lines point at the same few real latent and text-feature files (eight world clips
coded by the bundled VAE and prompt encoder): 1,000 lines and `--entries` lines. Each run is its own process;
reported side by side: seconds from the process start to the end of the first optimizer step (the large set
twice: with its byte-offset index still to build, and cached), median seconds per step after the first,
seconds per step spent choosing the batch (`BatchPlanner.bins`) and the process's peak RSS. Times are given
as wall seconds and as this process's CPU seconds: on a shared, busy machine the CPU seconds are the fairer
comparison. `--data-only` runs the data path alone (index, batch planning, loading the batch's latents and text
features) without the model: what differs between the two sets, without the training step's compute noise.

`--caption-bytes` reports the stored bytes of one caption's text features before (float32, T5 states padded to the
encoder's length) and after (`training.data.stored_text_features`: bfloat16, trimmed after the last valid token),
measured on the bundled model's prompts, and the same for the published miniFLUX's sizes (T5-XXL 4096 x 128, CLIP
pooled 768) at those prompts' T5 token counts.
"""
import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from benchmarks.report import child_figures

RECIPE = "training/configs/tiny_shapes_flow.yaml"
CLIPS = 8


def features(work: Path) -> tuple:
    """(annotations with latent + text features of a few world clips, empty-prompt features), made once."""
    from pyramid_app.options.settings import BUNDLED_MODEL
    from training import extract_latents, extract_text_features
    from training.shapes_world import write_world

    text = work / "features" / "text"
    if not (text / "annotations.jsonl").is_file():
        world = write_world(work / "world", CLIPS, seed=0, heldout=0)
        latents = work / "features" / "latents"
        assert extract_latents.main(["--model", str(BUNDLED_MODEL), "--annotations", str(world), "--output-dir",
                                     str(latents), "--fps", "8", "--seconds", "2", "--buckets", "64x64"]) == 0
        assert extract_text_features.main(["--model", str(BUNDLED_MODEL), "--annotations",
                                           str(latents / "annotations.jsonl"), "--output-dir", str(text)]) == 0
    return text / "annotations.jsonl", text / extract_text_features.EMPTY_TEXT_FILE


def write_lines(source: Path, target: Path, count: int) -> Path:
    """`count` lines cycling over the records of `source` (written in blocks; skipped when already there)."""
    if target.is_file():
        return target
    records = [line.encode() + b"\n" for line in source.read_text().splitlines() if line.strip()]
    block_lines = min(count, 10_000)
    block = b"".join(records[i % len(records)] for i in range(block_lines))
    temporary = target.with_suffix(".tmp")
    with temporary.open("wb") as handle:
        for _ in range(count // block_lines):
            handle.write(block)
        handle.write(b"".join(records[i % len(records)] for i in range(count % block_lines)))
    temporary.replace(target)
    return target


def child(annotations: str, empty: str, steps: int, output: str) -> dict:
    """One training run in this process; returns its figures."""
    started, started_cpu = time.perf_counter(), time.process_time()
    from pyramid_app.options.settings import BUNDLED_MODEL
    from training.config import load_config
    from training.loop import Trainer
    from training.packing import BatchPlanner

    planning, finished, finished_cpu = [], [], []
    bins = BatchPlanner.bins

    def timed_bins(self, step):
        begun = time.perf_counter()
        out = bins(self, step)
        planning.append(time.perf_counter() - begun)
        return out

    BatchPlanner.bins = timed_bins
    step = Trainer.optimizer_step

    def timed_step(self):
        out = step(self)
        finished.append(time.perf_counter())
        finished_cpu.append(time.process_time())
        return out

    Trainer.optimizer_step = timed_step
    config = load_config(RECIPE, [f"model.pretrained={BUNDLED_MODEL}", f"data.annotations=[{annotations}]",
                                  f"data.empty_text_fea={empty}", f"train.output_dir={output}", f"train.max_steps={steps}",
                                  "train.checkpoint_every=1000000", "validation.every_steps=null"])
    Trainer(config, output).train()
    gaps = [b - a for a, b in zip(finished, finished[1:])]
    cpu_gaps = [b - a for a, b in zip(finished_cpu, finished_cpu[1:])]
    return {"first_step_s": finished[0] - started, "step_s": statistics.median(gaps),
            "first_step_cpu_s": finished_cpu[0] - started_cpu, "step_cpu_s": statistics.median(cpu_gaps),
            "planning_s": statistics.median(planning), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def data_child(annotations: str, steps: int) -> dict:
    """The data path alone, as the trainer runs it for one process: open the index (building it when missing),
    plan each step's global batch and load its samples (latents + text features). Returns its figures."""
    started, started_cpu = time.perf_counter(), time.process_time()
    from training.annotation_index import AnnotationIndex
    from training.config import load_config
    from training.data import AnnotatedDataset
    from training.packing import BatchPlanner, RankBatches

    config = load_config(RECIPE)
    data, train = config["data"], config["train"]
    index = AnnotationIndex([annotations])
    planner = BatchPlanner(index, data, config["objective"], train["seed"], train["global_batch_size"], 1, 8)
    dataset = AnnotatedDataset(index, data["buckets"], data["fps"], 8, use_latents=True, use_text_features=True)
    finished, finished_cpu = [], []
    for bins in RankBatches(planner, 0, 1, 0, steps):
        assert all(error is None for _, error in (dataset[request] for request in bins))
        finished.append(time.perf_counter())
        finished_cpu.append(time.process_time())
    gaps = [b - a for a, b in zip(finished, finished[1:])]
    cpu_gaps = [b - a for a, b in zip(finished_cpu, finished_cpu[1:])]
    return {"first_step_s": finished[0] - started, "step_s": statistics.median(gaps), "first_step_cpu_s":
            finished_cpu[0] - started_cpu, "step_cpu_s": statistics.median(cpu_gaps), "planning_s": statistics.median(gaps),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


PUBLISHED_T5 = (128, 4096)  # the published miniFLUX's T5 states per caption
PUBLISHED_POOLED = 768


def caption_bytes() -> dict:
    """Bytes per caption before and after, on the bundled model (measured) and at the published sizes."""
    import torch

    from model_core.text import load_prompt_encoder
    from pyramid_app.options.settings import BUNDLED_MODEL
    from training.data import stored_text_features
    from training.shapes_world import PROMPTS

    encoder = load_prompt_encoder(BUNDLED_MODEL, device=torch.device("cpu"))
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    before, after, tokens = [], [], []
    for prompt in PROMPTS:
        embeddings = encoder.encode(prompt, device=torch.device("cpu"))
        before.append(size((embeddings.hidden_states.float(), embeddings.attention_mask, embeddings.pooled.float())))
        after.append(size(stored_text_features(embeddings).values()))
        tokens.append(int(embeddings.attention_mask.sum()))
    length, width = PUBLISHED_T5
    published_before = length * width * 4 + length * 8 + PUBLISHED_POOLED * 4
    published_after = [n * width * 2 + n * 8 + PUBLISHED_POOLED * 2 + 8 for n in tokens]
    return {"prompts": len(PROMPTS), "mean_t5_tokens": statistics.mean(tokens),
            "bundled_bytes_before": statistics.mean(before), "bundled_bytes_after": statistics.mean(after),
            "published_bytes_before": published_before, "published_bytes_after": statistics.mean(published_after),
            "published_bytes_after_at_77_tokens": 77 * width * 2 + 77 * 8 + PUBLISHED_POOLED * 2 + 8}


def run_child(annotations: Path, empty: Path, steps: int, output: Path, data_only: bool) -> dict:
    command = [sys.executable, "-m", "benchmarks.data_scale", "--data-child" if data_only else "--child",
               str(annotations), str(empty), str(steps), str(output)]
    return child_figures(command)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000_000)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--work", default="outputs/data_scale")
    parser.add_argument("--data-only", action="store_true",
                        help="time the data path alone (index, batch planning, sample loading), without the model")
    parser.add_argument("--caption-bytes", action="store_true",
                        help="bytes per caption of the stored text features before and after bf16 + trimming")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--data-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        annotations, empty, steps, output = args.child
        print(json.dumps(child(annotations, empty, int(steps), output)))
        return 0
    if args.caption_bytes:
        print(json.dumps(caption_bytes()))
        return 0
    if args.data_child:
        print(json.dumps(data_child(args.data_child[0], int(args.data_child[2]))))
        return 0
    import shutil

    from training.annotation_index import index_folder

    work = Path(args.work)
    source, empty = features(work)
    small = write_lines(source, work / "small.jsonl", 1000)
    began = time.perf_counter()
    large = write_lines(source, work / f"large_{args.entries}.jsonl", args.entries)
    print(f"{args.entries:,} lines written in {time.perf_counter() - began:.0f} s ({large.stat().st_size / 2**30:.2f} GiB)")
    runs = {}
    for name, path in (("1,000 lines", small), (f"{args.entries:,} lines, index to build", large),
                       (f"{args.entries:,} lines, index cached", large)):
        if "to build" in name:
            shutil.rmtree(index_folder(path), ignore_errors=True)
        shutil.rmtree(work / "run", ignore_errors=True)
        runs[name] = run_child(path, empty, args.steps, work / "run", args.data_only)
        print(name, json.dumps(runs[name]), flush=True)
    print(f"| annotation set | first step s (CPU s) | s / step (CPU s) | planning ms / step | peak RSS MB |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in runs.items():
        print(f"| {name} | {r['first_step_s']:.1f} ({r['first_step_cpu_s']:.1f}) | {r['step_s']:.3f} ({r['step_cpu_s']:.3f}) "
              f"| {1000 * r['planning_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
