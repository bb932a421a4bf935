"""Training logs on the main process: the trackers a recipe picks (`train.report_to`: accelerate's TensorBoard or
Weights & Biases, `metrics.csv`, a tracker of our own with one CSV row per logged step, or none), a progress bar,
and the figures of a step's speed and memory: tokens/s, model FLOP utilisation against the device's datasheet
peak, and peak memory."""
import csv
import logging
import resource
import sys
from pathlib import Path

import torch
from accelerate.tracking import GeneralTracker
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)
DEFAULT_TRACKERS = ("tensorboard", "csv")
# dense bfloat16 tensor-core TFLOP/s of the datasheets (no sparsity), by a part of the CUDA device name
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4, "B200": 2250.0,
                    "A100": 312.0, "A800": 312.0, "L40S": 362.1, "L40": 181.0, "L4": 121.0, "A10G": 70.0,
                    "RTX 4090": 165.2, "RTX 3090": 71.0}


class MetricsCSV(GeneralTracker):
    """Scalars to `<output>/metrics.csv`. On resume, rows past the resumed step (written before an interruption)
    are dropped so the file stays one timeline."""

    name = "metrics_csv"
    requires_logging_directory = False

    def __init__(self, output_dir: Path, resumed_step: int = 0):
        super().__init__()
        self.csv_path = Path(output_dir) / "metrics.csv"
        self.resumed_step = resumed_step
        self.fields = None

    @property
    def tracker(self):
        return self.csv_path

    def start(self) -> None:
        """Called by `Accelerator.init_trackers` on the main process only."""
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        if self.csv_path.is_file():
            with self.csv_path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                self.fields = reader.fieldnames
                kept = [row for row in reader if int(row["step"]) <= self.resumed_step]
            self._rewrite(kept)

    def _rewrite(self, rows) -> None:
        temporary = self.csv_path.with_suffix(".csv.tmp")
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)
        temporary.replace(self.csv_path)

    def log(self, values: dict, step=None, **kwargs) -> None:
        if self.fields is None:
            self.fields = ["step", *values]
            self._rewrite([])
        with self.csv_path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore").writerow({"step": step, **values})


def progress_bar(start_step: int, max_steps: int, enabled: bool):
    """Steps done of the run's total with the rate and ETA (tqdm), on the main process."""
    return tqdm(total=max_steps, initial=start_step, disable=not enabled, unit="step", dynamic_ncols=True, desc="training")


def trackers(report_to, output_dir: Path, resumed_step: int) -> tuple:
    """(accelerate's `log_with`, its `init_kwargs`) for `train.report_to` (a name or a list of them; `none` for no
    tracker). Events past the resumed step (written before an interruption) are dropped, in TensorBoard as in
    metrics.csv; a W&B run resumes under the output folder's name."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or DEFAULT_TRACKERS)
    names = [name for name in names if name != "none"]
    if "wandb" in names:
        from accelerate.utils import is_wandb_available

        if not is_wandb_available():
            raise ValueError("train.report_to names wandb but the wandb package is not installed; pip install wandb, "
                             "or report to tensorboard, csv or none")
    log_with = [MetricsCSV(output_dir, resumed_step) if name == "csv" else name for name in names]
    init_kwargs = {"tensorboard": {"purge_step": resumed_step + 1 if resumed_step else None},
                   "wandb": {"name": Path(output_dir).name, "dir": str(output_dir), "resume": "allow"}}
    return log_with or None, {name: init_kwargs[name] for name in names if name in init_kwargs}


def peak_tflops(device: torch.device):
    """The device's dense bfloat16 datasheet TFLOP/s, or None where none is known (every CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for part, value in PEAK_BF16_TFLOPS.items() if part in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """GiB at the peak since the last call: the CUDA allocator's peak (reset here), or on a CPU the process's peak
    resident set since it started."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class Utilisation:
    """Model FLOP utilisation of the training steps: 6 x parameters x image tokens per step (forward and backward
    of every weight once per token; text tokens and attention's own products left out, so the figure is a lower
    bound) over the elapsed time times the peak of all processes' devices. None where no peak is known."""

    def __init__(self, parameters: int, device: torch.device, world: int):
        self.flops_per_token = 6 * parameters
        peak = peak_tflops(device)
        self.peak = None if peak is None else peak * 1e12 * world
        if peak is None:
            logger.info("MFU is not logged: no peak FLOP/s is known for %s", describe_device(device))

    def __call__(self, tokens: float, elapsed: float):
        return None if self.peak is None else self.flops_per_token * tokens / elapsed / self.peak


def describe_device(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
