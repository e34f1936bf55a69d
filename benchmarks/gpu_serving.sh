#!/usr/bin/env bash
# espro served on one CUDA device through Ray Serve with the `auto` engine, end to end: the
# ResNet-18 ensemble (15 members) and the CNN at c = 1, 32 and 128, 1 and 16 images per
# request, over Serve gRPC, direct gRPC, REST binary (through Serve and direct) and native JSON,
# beside the in-process engine; images/s and p50/p99 per cell, within a 9-minute limit:
#   bash benchmarks/gpu_serving.sh            # writes benchmarks/results/serving-cuda.json
# PYTHON picks the interpreter (default: .venv/bin/python, else python3; it needs espro with
# its `serving` extra, or PyTorch and SITE), SERVING_JSON the output, CUDA_VISIBLE_DEVICES the
# device. SITE (default .gpu/site.tar.xz, from benchmarks/pack_site.sh), where it exists, is
# unpacked and espro installed beside it, for a machine without a package index. Ray binds
# loopback only inside the network namespace the script makes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
SERVING_JSON=${SERVING_JSON:-benchmarks/results/serving-cuda.json}
SITE=${SITE:-.gpu/site.tar.xz}
for tool in unshare ip; do
    command -v "$tool" >/dev/null ||
        { echo "gpu_serving.sh needs $tool for a loopback-only namespace" >&2; exit 2; }
done
if [ -f "$SITE" ]; then
    site=$(mktemp -d)
    tar -xJf "$SITE" -C "$site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade \
        --target "$site" .
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible to torch"'
timeout 540 unshare --net sh -c 'ip link set lo up; exec "$@"' sh \
    "$PYTHON" benchmarks/serving_load.py --device cuda --models resnet18 cnn \
    --targets engine espro --doors grpc grpc-direct rest-binary rest-binary-direct native \
    --concurrency 1 32 128 --images 1 16 --threads 2 --duration 3 --warmup 1 \
    --out "$SERVING_JSON"
