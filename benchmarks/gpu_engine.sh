#!/usr/bin/env bash
# The CUDA checks (engines, training, prediction) and the engine benchmark on one CUDA device,
# in under 5 minutes:
#   bash benchmarks/gpu_engine.sh            # writes benchmarks/results/engine-cuda.json
# PYTHON picks the interpreter (default: .venv/bin/python, else python3), ENGINE_JSON the
# benchmark's output, CUDA_VISIBLE_DEVICES the device. The benchmark runs even when a check
# fails; the exit status is non-zero when either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
ENGINE_JSON=${ENGINE_JSON:-benchmarks/results/engine-cuda.json}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" - <<'PY' || exit 2
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
try:
    import onnxruntime
    print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
except ImportError:
    print("onnxruntime not installed: the onnx engine is skipped")
PY

timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py \
    tests/test_engine.py -k cuda
checks=$?
timeout 170 "$PYTHON" benchmarks/engine.py --device cuda --out "$ENGINE_JSON"
bench=$?
echo "checks exit $checks, benchmark exit $bench (124: timed out)"
[ "$checks" -eq 0 ] && [ "$bench" -eq 0 ]
