#!/usr/bin/env bash
# The GPU check of issue 22 on a lent H100/H200 (torch 2.11 + CUDA, transformers, accelerate; no diffusers, torchao,
# pytest maybe): run from the repository root with the wheels in .whl/ and the authors' code in .official/,
# outputs under $OUT. At most about 9.5 minutes: suite 300 s budget (+ start-up), side by side at most 160 s, GPU tests at most 70 s.
#
#   bash benchmarks/gpu_run.sh
set -u
OUT=${OUT:?set OUT to the folder for the results}
mkdir -p "$OUT"
started=$SECONDS

# diffusers and torchao always; the others only where the device lacks them (never shadow its own builds)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/diffusers-*.whl .whl/torchao-*.whl
for pair in requests:requests urllib3:urllib3 idna:idna certifi:certifi charset_normalizer:charset_normalizer \
            PIL:pillow pytest:pytest pluggy:pluggy iniconfig:iniconfig pygments:pygments; do
    module=${pair%%:*} wheel=${pair##*:}
    python3 -c "import $module" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/${wheel}-*.whl
done
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>&1

timeout 330 python3 -m benchmarks.gpu_suite --out "$OUT" --budget-s 300 > "$OUT/gpu_suite.log" 2>&1
echo "suite rc=$? at $((SECONDS - started)) s"

timeout 160 python3 -m benchmarks.official_side_by_side --published --official .official --out "$OUT" \
    --first-frame-steps 10 10 10 --video-steps 5 5 5 > "$OUT/official_side_by_side.log" 2>&1
echo "side by side rc=$? at $((SECONDS - started)) s"
python3 -m benchmarks.gpu_suite --out "$OUT" --side-by-side "$OUT/official_side_by_side.json" > /dev/null  # one table

timeout 70 python3 -m pytest -q -o addopts="" -p no:cacheprovider -m gpu -rs tests/test_pipeline.py tests/test_quantization.py \
    > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? at $((SECONDS - started)) s"
tail -n 3 "$OUT/gpu_tests.log"
cat "$OUT/gpu_suite.md" 2>/dev/null  # the suite's rows, then the side by side's
