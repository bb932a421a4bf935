"""Timing shared by the benchmarks that compare two ways of doing the same work in one run."""
import statistics
import time


def median_seconds(work, repeats: int) -> float:
    """Median wall time of `work()` over `repeats` calls, after one untimed warm-up call."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def timed_side_by_side(step, baseline, candidate, repeats: int) -> tuple:
    """(median seconds of step(baseline), of step(candidate), largest loss difference relative to the baseline's)."""
    baseline_seconds = median_seconds(lambda: step(baseline), repeats)
    candidate_seconds = median_seconds(lambda: step(candidate), repeats)
    baseline_losses, candidate_losses = step(baseline), step(candidate)
    difference = float((candidate_losses - baseline_losses).abs().max() / baseline_losses.abs().max())
    return baseline_seconds, candidate_seconds, difference
