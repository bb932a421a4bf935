"""Training logs on the main process: TensorBoard scalars and one CSV row per logged step."""
import csv
from pathlib import Path


class TrainingLog:
    """Scalars to `<output>/logs` (TensorBoard) and `<output>/metrics.csv`. On resume, CSV rows past
    the resumed step (written before an interruption) are dropped so the file stays one timeline."""

    def __init__(self, output_dir: Path, enabled: bool, resumed_step: int = 0):
        self.enabled = enabled
        self.csv_path = Path(output_dir) / "metrics.csv"
        self.fields = None
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / "logs"), purge_step=resumed_step + 1 if resumed_step else None)
        if self.csv_path.is_file():
            with self.csv_path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                self.fields = reader.fieldnames
                kept = [row for row in reader if int(row["step"]) <= resumed_step]
            self._rewrite(kept)

    def _rewrite(self, rows) -> None:
        temporary = self.csv_path.with_suffix(".csv.tmp")
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            writer.writeheader()
            writer.writerows(rows)
        temporary.replace(self.csv_path)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()
        if self.fields is None:
            self.fields = ["step", *scalars]
            self._rewrite([])
        with self.csv_path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore").writerow({"step": step, **scalars})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
