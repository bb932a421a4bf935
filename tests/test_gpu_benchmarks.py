"""The GPU suite's FLOP count, its smoke run on the CPU, its budget and failure handling, and the side-by-side
with the official code (when a checkout of it is present)."""
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import gpu_suite
from benchmarks.dit_flops import forward_flops, generation_flops
from benchmarks.random_models import Clip, build_transformer, build_vae, model_configs, random_prompt, text_to_video
from model_core.temporal import history_layout, tokens_per_frame
from reference import REFERENCE_DIR

OFFICIAL = Path(os.environ.get("PYRAMID_FLOW_OFFICIAL", Path(__file__).resolve().parents[1] / ".official"))


@pytest.mark.parametrize("name, index", [("layout_miniflux_transformer.json", 0), ("layout_causal_vae.json", 1)])
def test_published_configs_are_the_official_layouts(name, index):
    reference = json.loads((REFERENCE_DIR / name).read_text())["config"]
    config = model_configs(tiny=False)[index]
    assert {key: _listed(config[key]) for key in reference} == {key: _listed(value) for key, value in reference.items()}


def _listed(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def test_counted_flops_equal_what_a_guided_forward_multiplies(monkeypatch):
    """Matrix products as torch's FlopCounterMode counts them, attention as the SDPA calls' shapes say."""
    config, _ = model_configs(tiny=True)
    transformer = build_transformer(config, "cpu", torch.float32)
    latent_h, latent_w, unit, stage, text_tokens = 16, 24, 3, 2, 10
    clips = []
    for clip in history_layout(unit, stage):
        shrink = 2 ** (2 - clip.level)
        clips.append(torch.randn(2, 16, clip.length, latent_h // shrink, latent_w // shrink))
    clips.append(torch.randn(2, 16, 1, latent_h, latent_w))
    prompt = random_prompt(config, valid_tokens=4, seed=0, device="cpu", text_tokens=text_tokens).repeat(2)
    attention = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted_sdpa(*args, **kwargs):
        q, k = (kwargs[name] if name in kwargs else args[index] for index, name in enumerate(("query", "key")))
        attention.append(4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted_sdpa)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        transformer(sample=[clips], encoder_hidden_states=prompt.hidden_states, encoder_attention_mask=prompt.attention_mask,
                    pooled_projections=prompt.pooled, timestep=torch.tensor([500.0, 500.0]))
    products = sum(v for op, v in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.addmm", "aten.mm", "aten.bmm"))
    frames = [tokens_per_frame(latent_h, latent_w, c.level) for c in history_layout(unit, stage) for _ in range(c.length)]
    frames.append(tokens_per_frame(latent_h, latent_w, stage))
    assert len(attention) == 2 * len(frames)  # one call per causal group in each of the two blocks
    assert forward_flops(config, frames, batch=2, text_tokens=text_tokens) == products + sum(attention)


def test_generation_flops_of_the_published_384p_clip():
    config, _ = model_configs(tiny=False)
    clip = (config, 384, 640, 16, (20, 20, 20), (10, 10, 10))
    guided = generation_flops(*clip, guided=True, text_tokens=40)
    assert guided == 2 * generation_flops(*clip, guided=False, text_tokens=40)
    # about 2.1 GFLOP per token and forward (24 blocks of 12 D^2 multiply-adds, D = 1,920): a few PFLOP in all
    assert 1e15 < guided < 1e16
    # 88 text tokens fewer per row: ~2.1 GFLOP per token and forward, 2 rows, 20x3 + 15x10x3 forwards, at least
    assert guided < generation_flops(*clip, guided=True, text_tokens=128) - 88 * 2.1e9 * 2 * 510


@pytest.mark.slow  # every row: over a minute of CPU time (compile traces the forward for every input shape)
def test_smoke_run_measures_baselines_and_refuses_what_is_not_here(tmp_path):
    gpu_suite.main(["--smoke", "--out", str(tmp_path), "--official", str(tmp_path / "absent")])
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    rows = {(r["row"], r["size"]): r for r in report["rows"]}
    assert [r["row"] for r in report["rows"]] == [r.name for r in gpu_suite.suite_rows()]
    for key in (("baseline", "384p"), ("baseline", "768p"), ("compile=True", "384p")):
        assert rows[key]["status"] == "ok" and rows[key]["sampling_s"] > 0 and rows[key]["dit_tflops"] > 0
        assert rows[key]["finite"]
    compiled = rows[("compile=True", "384p")]
    assert compiled["settings"]["compile"] == "True: whole forward, one graph per shape, eager"
    assert compiled["shapes_new_after_warm_up"] == 0 and compiled["warm_up_shapes"] == compiled["input_shapes"]
    assert rows[("compile=max (CUDA graphs)", "384p")]["note"].startswith("compile 'max' captures CUDA graphs")
    assert rows[("official side by side", "384p")]["status"] == "not run"
    assert rows[("quantize=fp8", "384p")]["status"] == "unavailable"
    assert rows[("offload=group", "384p")]["note"].startswith("offload=group moves weights")
    assert rows[("cache=first-block (0.05)", "384p")]["status"] == "ok"
    assert rows[("attention=flex", "384p")]["status"] == "ok"
    assert rows[("attention=flash", "384p")]["status"] == "unavailable"
    assert "| 384p | baseline |" in (tmp_path / "gpu_suite.md").read_text()


def test_a_short_smoke_run_measures_and_refuses(tmp_path):
    suite = _suite(tmp_path, [gpu_suite.Row("baseline", "384p"), gpu_suite.Row("offload=model", "384p", offload="model"),
                              gpu_suite.Row("cache", "384p", cache=("first-block", 0.05))])
    suite.run()
    baseline, offload, cache = json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]
    assert baseline["status"] == "ok" and baseline["total_s"] >= baseline["sampling_s"] > 0 and baseline["dit_tflops"] > 0
    assert offload["status"] == "unavailable"
    # FLOPs counted with the text the transformer got: the [negative ; prompt] batch keeps 40 of 128 columns
    assert baseline["text_tokens"] == 40 == suite.negative.followed_by(suite.text).without_padding_columns().hidden_states.shape[1]
    clip = suite.clip("384p")
    flops = generation_flops(suite.transformer_config, clip.height, clip.width, clip.num_units, clip.first_frame_steps,
                             clip.video_steps, guided=True, text_tokens=40)
    assert baseline["dit_tflop"] == float(f"{flops / 1e12:.4g}")
    assert baseline["peak_vram_allocated_gib"] is None and baseline["peak_vram_reserved_gib"] is None  # no GPU
    assert "cache_steps" not in baseline
    # the cache row: every step of the timed clip decided (5 units x 3 stages x 1 step), and the skips counted
    assert cache["cache_steps"] == 15 and 0 <= cache["cache_skipped_steps"] <= 15
    assert cache["cache_skip_share"] == round(cache["cache_skipped_steps"] / 15, 3)
    table = (tmp_path / "gpu_suite.md").read_text()
    assert f"skipped {cache['cache_skipped_steps']} of 15 steps; hook overhead only (random weights) |" in table
    assert "| 384p | baseline |" in table and "| None / None | 40 |" in table


def test_the_table_gives_peak_allocated_and_reserved_memory():
    row = {"status": "ok", "row": "baseline", "size": "384p", "total_s": 9.0, "sampling_s": 8.0, "decode_s": 1.0,
           "peak_vram_allocated_gib": 20.5, "peak_vram_reserved_gib": 24.25, "text_tokens": 40, "dit_tflops": 300.0,
           "of_matmul": 0.4, "settings": {}, "finite": True}
    report = {"device": {"name": "NVIDIA H100", "versions": {}}, "weights": "random", "rows": [row]}
    assert "| 384p | baseline | 9.0 | 8.0 | 1.0 | 20.5 / 24.25 | 40 | 300.0 | 0.4 |" in gpu_suite.markdown(report)


SIDE = {"height": 384, "width": 640, "units": 16, "first_frame_steps": [10] * 3, "video_steps": [5] * 3,
        "ours_s": 30.5, "official_s": 120.0, "time_ratio": 0.254, "ours_peak_gib": 20.0, "official_peak_gib": 30.0}


def side_by_side_suite(tmp_path, monkeypatch, child_code: str, budget_s=600.0):
    """A suite of the side-by-side row alone whose child is `child_code` (Python, run with the output folder as its
    argument), the official checkout a stand-in folder."""
    official = tmp_path / "official"
    (official / "pyramid_dit").mkdir(parents=True)
    monkeypatch.setattr(gpu_suite, "side_by_side_command",
                        lambda official_, out, clip, smoke: [sys.executable, "-c", child_code, str(out)])
    suite = gpu_suite.Suite(tmp_path / "out", smoke=True, budget_s=budget_s, official=official,
                            rows=[gpu_suite.Row("official side by side", "384p", side_by_side=True)])
    suite.run()
    return suite.report["rows"][0], (tmp_path / "out" / "gpu_suite.md").read_text()


WRITE_SIDE = "import json, sys, pathlib; pathlib.Path(sys.argv[1], 'official_side_by_side.json').write_text(json.dumps({}))"


def test_the_official_side_by_side_row_gives_its_figures_and_table(tmp_path, monkeypatch):
    row, table = side_by_side_suite(tmp_path, monkeypatch, WRITE_SIDE.format({**SIDE, "max_latent_difference": 0.01}))
    assert row["status"] == "ok" and row["side_by_side"] == {**SIDE, "max_latent_difference": 0.01}
    assert "| 384p | official side by side | 30.5 | - |" in table and "ours / official 0.254: the table below |" in table
    assert "| 384x640 | 16 | [10, 10, 10] / [5, 5, 5] | 30.5 | 120.0 | 0.254 | 20.0 / 30.0 | 0.01 |" in table


def test_the_official_side_by_side_row_stops_at_its_box_and_keeps_what_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "SMOKE_BOX_S", 3.0)
    timed_then_stuck = WRITE_SIDE.format(SIDE) + "; import time; time.sleep(60)"
    row, table = side_by_side_suite(tmp_path, monkeypatch, timed_then_stuck)
    assert row["status"] == "ok" and row["row_s"] < 20
    assert row["side_by_side"]["max_latent_difference"] == "not reached (its time box ended)"
    assert "| 0.254 | 20.0 / 30.0 | not reached (its time box ended) |" in table
    row, _ = side_by_side_suite(tmp_path / "again", monkeypatch, "import time; time.sleep(60)")
    assert row == {**row, "status": "stopped", "note": "its time box ended before it timed both sides"}


def test_the_official_side_by_side_row_not_found_not_reached_or_failed(tmp_path, monkeypatch):
    suite = gpu_suite.Suite(tmp_path, smoke=True, budget_s=600.0, official=tmp_path / "absent",
                            rows=[gpu_suite.Row("official side by side", "384p", side_by_side=True)])
    suite.run()
    (row,) = suite.report["rows"]
    assert row["status"] == "not run" and row["note"] == f"official code not found (no {tmp_path / 'absent'}/pyramid_dit)"
    assert "| 384p | official side by side | - | - | - | - | - | - | - | not run: official code not found" in (
        tmp_path / "gpu_suite.md").read_text()
    row, _ = side_by_side_suite(tmp_path / "short", monkeypatch, WRITE_SIDE.format(SIDE), budget_s=5.0)
    assert row["status"] == "not reached"
    row, _ = side_by_side_suite(tmp_path / "failing", monkeypatch, "raise SystemExit(3)")
    assert row["status"] == "error" and row["note"].startswith("the side by side exited with status 3")


def test_the_side_by_side_command_times_the_suite_clip_at_its_steps(tmp_path):
    published = gpu_suite.side_by_side_command(tmp_path / "official", tmp_path, Clip(384, 640, 16), smoke=False)
    assert published[1:4] == ["-m", "benchmarks.official_side_by_side", "--published"]
    assert " --height 384 --width 640 --units 16 --first-frame-steps 10 10 10 --video-steps 5 5 5" in " ".join(published)
    from benchmarks.official_side_by_side import parse_arguments

    smoke = gpu_suite.side_by_side_command(tmp_path / "official", tmp_path, Clip(64, 64, 2), smoke=True)
    args = parse_arguments(smoke[3:])  # the CPU's tiny mode, one run per side
    assert (args.mode, args.height, args.width, args.units, args.repeats) == ("tiny", 64, 64, 2, 1)
    assert args.official == tmp_path / "official" and args.first_frame_steps == args.video_steps == [1, 1, 1]


def test_rows_compile_the_whole_forward_at_their_level():
    config, _ = model_configs(tiny=True)
    for row, compiled in ((gpu_suite.Row("c", "384p", compile=True), "True: whole forward, one graph per shape, eager"),
                          (gpu_suite.Row("c", "384p", compile=True, cache=("first-block", 0.1)),
                           "True: whole forward, graph breaks allowed, no CUDA graphs (hooks in the forward), eager")):
        transformer = build_transformer(config, "cpu", torch.float32)
        settings = gpu_suite.apply_row_options(row, transformer, None, torch.device("cpu"), compile_backend="eager")
        assert settings["compile"] == compiled and "forward" in vars(transformer)  # speed.compile_forward's
    with pytest.raises(gpu_suite.Unavailable, match="compile 'max' captures CUDA graphs and needs a CUDA GPU"):
        gpu_suite.apply_row_options(gpu_suite.Row("m", "384p", compile="max"), transformer, None, torch.device("cpu"))
    rows = {row.name: row for row in gpu_suite.suite_rows()}
    assert rows["compile=True"].compile is True and rows["compile=max (CUDA graphs)"].compile == "max"
    assert rows[gpu_suite.BEST].compile == "max" and rows[gpu_suite.BEST].cache is None
    assert [row.name for row in gpu_suite.suite_rows()[:6]] == [
        "baseline", gpu_suite.BEST, "compile=True", "compile=max (CUDA graphs)", "official side by side", gpu_suite.BEST]


def test_a_compiled_row_warms_up_every_shape_of_its_clip_padded_to_its_buckets(tmp_path, monkeypatch):
    """The warm-up of a compiled row meets every input shape of the timed clip (its steps do not change a shape),
    and text_to_video pads the history to the pipeline's shape buckets when compiled: fewer shapes than eager."""
    monkeypatch.setattr(gpu_suite, "SMOKE_UNITS", 7)
    suite = _suite(tmp_path, [])
    config, vae_config = model_configs(tiny=True)
    transformer, vae = build_transformer(config, "cpu", torch.float32), build_vae(vae_config, "cpu", torch.float32)
    timed = Clip(64, 64, 7, (2, 1, 1), (1, 2, 1))

    def shapes(clip, compile):
        inputs = gpu_suite.ForwardInputs(transformer)
        text_to_video(transformer, vae, clip, suite.text, suite.negative, "cpu", decode=False, compile=compile)
        inputs.hook.remove()
        return inputs.shapes

    warm_up = suite.warm_up_clip(gpu_suite.Row("c", "384p", compile=True))
    assert (warm_up.num_units, warm_up.first_frame_steps, warm_up.video_steps) == (7, (1, 1, 1), (1, 1, 1))
    assert suite.warm_up_clip(gpu_suite.Row("m", "384p", compile="max")).video_steps == (2, 2, 2)
    assert suite.warm_up_clip(gpu_suite.Row("e", "384p")).num_units == 2
    bucketed = shapes(timed, True)
    assert shapes(warm_up, True) == bucketed
    eager = shapes(timed, False)
    assert len(bucketed) < len(eager) and any(padded for _, padded in bucketed) and not any(p for _, p in eager)


def script_numbers() -> dict:
    """The NAME=seconds settings of benchmarks/gpu_run.sh."""
    script = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_run.sh").read_text()
    return {name: int(value) for name, value in re.findall(r"\b([A-Z]+_S)=(\d+)", script)}, script


def test_the_gpu_run_is_bounded_by_construction():
    """Set-up and the suite within 6 minutes, the GPU tests after: well under 8 minutes in all; the suite's hard
    limit leaves its rows' budget room for its imports and a row's last step past its box."""
    numbers, script = script_numbers()
    assert set(numbers) == {"SETUP_S", "SUITE_S", "TESTS_S"}
    assert numbers["SETUP_S"] + numbers["SUITE_S"] <= 360 and sum(numbers.values()) <= 450
    assert numbers["SUITE_S"] - gpu_suite.BUDGET_S >= 15 and numbers["TESTS_S"] <= 70
    for name in numbers:
        assert f'timeout "${name}"' in script
    assert "--budget-s" not in script  # the suite's own BUDGET_S, which the sums above were checked against
    first_rows = gpu_suite.suite_rows()[:2]  # the eager baseline and the best setting fit the budget together
    assert sum(row.box_s(False) for row in first_rows) <= gpu_suite.BUDGET_S


def test_the_per_group_row_measures_one_call_per_group_and_restores_the_plan(tmp_path, monkeypatch):
    from model_core.transformers import attention_plan

    monkeypatch.setitem(attention_plan.CALL_OVERHEAD_MACS, "cpu", 1e12)  # the CPU plans like a GPU for this test
    calls = []
    planner = attention_plan.plan_calls
    monkeypatch.setattr("model_core.transformers.attention.plan_calls", lambda *a: calls.append(planner(*a)) or calls[-1])
    suite = _suite(tmp_path, [gpu_suite.Row("per group", "384p", per_group_calls=True)])
    suite.run()
    (row,) = suite.report["rows"]
    assert row["status"] == "ok" and row["settings"] == {"attention_calls": "one per causal group"}
    assert attention_plan.CALL_OVERHEAD_MACS["cpu"] == 1e12
    assert max(len(plan) for plan in calls) > 1  # history groups were not merged during the row


def _suite(tmp_path, rows, budget_s=600.0):
    return gpu_suite.Suite(tmp_path, smoke=True, budget_s=budget_s, rows=rows)


def test_rows_whose_time_box_does_not_fit_are_listed_as_not_reached(tmp_path):
    suite = _suite(tmp_path, gpu_suite.suite_rows()[:3], budget_s=5.0)
    suite.run()
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [r["status"] for r in report["rows"]] == ["not reached"] * 3
    assert report["rows"][0]["note"].startswith(f"its {gpu_suite.SMOKE_BOX_S:.0f} s time box did not fit in the ")


ONE_STEP_S = 1.5  # how far past its deadline a row runs: the sampler checks the deadline once per step


def planned_with_fake_timings(rows, seconds, budget_s):
    """planned_rows on a fake clock: row i takes seconds[i], or stops one step past its deadline as measure() does."""
    now = [0.0]

    def measure(row, deadline):
        took = seconds[rows.index(row)]
        if now[0] + took > deadline:
            now[0] = deadline + ONE_STEP_S
            return {"status": "stopped"}
        now[0] += took
        return {"status": "ok"}

    results = list(gpu_suite.planned_rows(rows, budget_s, False, measure, clock=lambda: now[0]))
    return [result["status"] for _, result in results], now[0], [row for row, _ in results]


def test_the_row_planner_starts_a_row_only_when_its_box_fits_and_stops_it_at_the_box():
    Row = gpu_suite.Row
    rows = [Row("baseline", "384p"), Row("best", "384p", compile=True), Row("best", "768p", compile=True),
            Row("fp8", "384p", fp8=True)]
    assert [row.box_s(False) for row in rows] == [90.0, 200.0, 290.0, 90.0]
    # 70 s, then a row slower than its box: stopped at 270 s; 28.5 s are left, too few for either box
    statuses, elapsed, listed = planned_with_fake_timings(rows, [70.0, 400.0, 10.0, 10.0], budget_s=300.0)
    assert listed == rows and statuses == ["ok", "stopped", "not reached", "not reached"]
    assert elapsed == 70.0 + 200.0 + ONE_STEP_S
    # a long row that does not fit does not keep a later, shorter one from running
    statuses, elapsed, _ = planned_with_fake_timings(rows, [80.0, 100.0, 10.0, 40.0], budget_s=300.0)
    assert statuses == ["ok", "ok", "not reached", "ok"] and elapsed == 220.0


def test_the_suite_rows_end_within_the_budget_whatever_they_take():
    """The published row list under the default budget with random row timings: never more than one step
    past the budget, every row listed, the eager baseline always measured."""
    rows, generator = gpu_suite.suite_rows(), torch.Generator().manual_seed(0)
    for _ in range(200):
        seconds = (torch.rand(len(rows), generator=generator) * 400).tolist()
        statuses, elapsed, listed = planned_with_fake_timings(rows, seconds, gpu_suite.BUDGET_S)
        assert elapsed <= gpu_suite.BUDGET_S + ONE_STEP_S and listed == rows
        assert statuses[0] in ("ok", "stopped") and set(statuses) <= {"ok", "stopped", "not reached"}


def test_a_failing_row_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(gpu_suite, "build_transformer", fail)
    written = []
    suite = _suite(tmp_path, [gpu_suite.Row("baseline", "384p"), gpu_suite.Row("offload=model", "384p", offload="model")])
    monkeypatch.setattr(suite, "write", lambda: written.append([row["status"] for row in suite.report["rows"]]))
    suite.run()
    first, second = suite.report["rows"]
    assert first["status"] == "error" and first["note"] == "RuntimeError: out of memory (simulated)"
    assert second["status"] == "error"  # every row builds its own models
    # written before the rows, every row listed, then after each
    assert written[:3] == [["not reached"] * 2, ["error", "not reached"], ["error", "error"]]


def test_options_missing_here_are_refused_with_the_reason():
    config, _ = model_configs(tiny=True)
    transformer = build_transformer(config, "cpu", torch.float32)
    for row, message in ((gpu_suite.Row("f", "384p", fp8=True), "quantize=fp8 is timed on a CUDA GPU only"),
                         (gpu_suite.Row("a", "384p", attention_backend="flash"), "attention_backend=flash: "),
                         (gpu_suite.Row("o", "384p", offload="group"), "offload=group moves weights")):
        with pytest.raises(gpu_suite.Unavailable, match=message):
            gpu_suite.apply_row_options(row, transformer, None, torch.device("cpu"))


def test_cache_and_flex_rows_apply_on_the_cpu():
    config, _ = model_configs(tiny=True)
    transformer = build_transformer(config, "cpu", torch.float32)
    settings = gpu_suite.apply_row_options(gpu_suite.Row("c", "384p", cache=("first-block", 0.1), attention_backend="flex"),
                                           transformer, None, torch.device("cpu"))
    assert settings == {"attention_backend": "flex", "cache": "first-block", "cache_threshold": 0.1}


@pytest.mark.slow
@pytest.mark.skipif(not (OFFICIAL / "pyramid_dit").is_dir(), reason="no checkout of the official code (set PYRAMID_FLOW_OFFICIAL)")
def test_official_side_by_side_matches_on_tiny_models(tmp_path):
    from benchmarks import official_side_by_side

    result = official_side_by_side.main(["--official", str(OFFICIAL), "--units", "2", "--repeats", "1",
                                         "--first-frame-steps", "1", "2", "1", "--video-steps", "1", "1", "2",
                                         "--out", str(tmp_path)])
    assert result["max_latent_difference"] < 1e-3
    assert result["ours_s"] > 0 and result["official_s"] > 0 and result["time_ratio"] > 0
    assert json.loads((tmp_path / "official_side_by_side.json").read_text()) == result
