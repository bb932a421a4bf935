"""Training logs on the main process: accelerate's TensorBoard tracker, `metrics.csv` (a tracker of our own: one
CSV row per logged step) and a progress bar."""
import csv
from pathlib import Path

from accelerate.tracking import GeneralTracker
from tqdm.auto import tqdm


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
