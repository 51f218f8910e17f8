#!/usr/bin/env bash
# The first GPU run, prepared: one command for a bare GPU machine (no network), hard deadline 7 minutes wall.
#
#   make gpu-pack                        # here: wheels the GPU image lacks + CamVid, in .gpu-pack/ (~52 MiB)
#   bash scripts/gpu_check.sh            # there, from the checkout, with .gpu-pack carried along
#   bash scripts/gpu_check.sh --dry-run  # anywhere: tiny sizes on the CPU, each CUDA step skipped with its reason
#
# Steps, each under what is left of the deadline (a step that would not fit is skipped, saying so):
#   install    pip install --no-index --no-deps the pack's wheels into a private folder (first on PYTHONPATH)
#   (a) cuda   pytest -m cuda tests/test_cuda.py (prefetcher, device cache, nvjpeg, GradScaler skip without a
#              host sync, channels_last, compile, real OOM message, SyncBatchNorm, peak memory)
#   (b) bench  scripts/benchmark.py train, deeplabv3plus + resnet50, bf16: 512x512 and CamVid size, each with
#              and without dataset.cache=device (ceiling, segkit, bare loop, reference; images/s, peak memory)
#   (c) train  CamVid from scratch (experiment=camvid_scratch_unet), time-boxed (<= 3 min; SIGTERM = the
#              trainer's own graceful stop), then segkit-evaluate on the last checkpoint
# Output (at most 8 files, for the device tool): summary.md (the table), log.txt (everything), cuda_tests.txt,
# benchmarks.md, train_epochs.csv, train_metrics.json, evaluate_metrics.json; in $OUT, or --out DIR.
#
# Options: --dry-run  --out DIR  --pack DIR (default .gpu-pack)  --data DIR (CamVid root; default <pack>/camvid,
#          else ../shared/datasets/camvid)  --train-steps N (the schedule's length, default 3000)
#          --deadline SECONDS (default 420)
set -uo pipefail
cd "$(dirname "$0")/.."

ARGS=("$@")
DRY_RUN=0
OUT_DIR=${OUT:-gpu-check-out}
PACK=.gpu-pack
DATA=""
TRAIN_STEPS=3000
DEADLINE_S=420
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT_DIR=$2; shift ;;
        --pack) PACK=$2; shift ;;
        --data) DATA=$2; shift ;;
        --train-steps) TRAIN_STEPS=$2; shift ;;
        --deadline) DEADLINE_S=$2; shift ;;
        *) echo "error: unknown option $1 (see the top of $0)" >&2; exit 2 ;;
    esac
    shift
done

# The hard deadline: the whole script runs again under `timeout`, which ends it and everything it started.
if [ -z "${GPU_CHECK_STARTED:-}" ]; then
    export GPU_CHECK_STARTED=$(date +%s)
    exec timeout --kill-after=10 "$DEADLINE_S" bash "$0" "${ARGS[@]}"
fi
END_AT=$((GPU_CHECK_STARTED + DEADLINE_S - 5))  # 5 s to write the summary
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
: > "$OUT_DIR/log.txt"
exec > >(tee -a "$OUT_DIR/log.txt") 2>&1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # run directories, checkpoints: not for $OUT
SUMMARY=$OUT_DIR/summary.md
if [ -z "$DATA" ]; then
    DATA=$PACK/camvid
    [ -d "$DATA" ] || DATA=../shared/datasets/camvid
fi

# ---------------------------------------------------------------------------- bookkeeping
seconds_left() { echo $((END_AT - $(date +%s))); }

# budget CAP RESERVE: seconds this step may take (at most CAP, leaving RESERVE for the steps after it).
# A dry run has no GPU slot to fit: each step may use what is left of the deadline.
budget() {
    [ $DRY_RUN = 1 ] && { seconds_left; return; }
    local left=$(($(seconds_left) - $2))
    echo $((left < $1 ? left : $1))
}

row() {  # row STEP STATUS RESULT SECONDS
    printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"
    printf '== %s: %s (%s) %s s\n' "$1" "$2" "$3" "$4"
}

run_timed() {  # run_timed LIMIT LOGFILE CMD...: the command's status; 124 = stopped at LIMIT seconds
    local limit=$1 log=$2
    shift 2
    STEP_START=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local status=${PIPESTATUS[0]}
    STEP_SECONDS=$(($(date +%s) - STEP_START))
    return "$status"
}

# ---------------------------------------------------------------------------- environment + install
{
    echo "# GPU check $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "\`bash scripts/gpu_check.sh$([ $DRY_RUN = 1 ] && echo ' --dry-run')\` on $(hostname);" \
         "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); deadline ${DEADLINE_S} s"
    echo
} > "$SUMMARY"

if [ $DRY_RUN = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # tiny sizes on the CPU, also where a GPU is present
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    INSTALL=("skipped" "dry run: the current environment")
else
    SITE=$WORK/site
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$PACK"/wheels/*.whl; then
        INSTALL=("ok" "$(ls "$PACK"/wheels | wc -l) wheels from $PACK/wheels, no network")
    else
        INSTALL=("FAILED" "pip install --no-index from $PACK/wheels (run make gpu-pack here and carry .gpu-pack)")
    fi
    export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$PY" - <<'EOF' | tee -a "$SUMMARY"
import importlib.metadata as md, platform, torch
names = ["torch", "torchvision", "timm", "segmentation-models-pytorch", "kornia", "torchmetrics", "hydra-core"]
versions = []
for name in names:
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        versions.append(f"{name} missing")
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"{device}; Python {platform.python_version()}; {', '.join(versions)}\n")
EOF
printf '| step | status | result | seconds |\n| --- | --- | --- | --- |\n' >> "$SUMMARY"
row "install" "${INSTALL[0]}" "${INSTALL[1]}" 0
HAVE_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ $DRY_RUN = 0 ] && [ "$HAVE_CUDA" != 1 ]; then
    echo "warning: no CUDA device visible: the CUDA tests skip and the GPU figures are not GPU figures"
fi

# ---------------------------------------------------------------------------- (a) CUDA tests
limit=$(budget 100 300)
# -q comes from pyproject's addopts; a second -q would drop the closing "N passed, M skipped" line.
run_timed "$limit" "$OUT_DIR/cuda_tests.txt" "$PY" -m pytest -m cuda tests/test_cuda.py -p no:cacheprovider -rs
status=$?
counts=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)' "$OUT_DIR/cuda_tests.txt" | tail -1 | tr -d '=')
reason=$(grep -m1 -oE 'SKIPPED \[[0-9]+\] [^ ]+ (.*)' "$OUT_DIR/cuda_tests.txt" | sed -E 's/SKIPPED \[[0-9]+\] [^ ]+ //')
if [ $status = 0 ] && [ "$HAVE_CUDA" = 1 ]; then
    row "(a) pytest -m cuda" "ok" "${counts:-no summary line}" "$STEP_SECONDS"
elif [ $status = 0 ]; then
    row "(a) pytest -m cuda" "skipped" "${counts:-no summary line}: ${reason:-no CUDA device}" "$STEP_SECONDS"
elif [ $status = 124 ]; then
    row "(a) pytest -m cuda" "TIMEOUT" "stopped after ${limit} s; ${counts:-see cuda_tests.txt}" "$STEP_SECONDS"
else
    row "(a) pytest -m cuda" "FAILED" "${counts:-exit $status}; see cuda_tests.txt" "$STEP_SECONDS"
fi

# ---------------------------------------------------------------------------- (b) benchmarks
BENCH_COMMON=(train trainer=gpu model=deeplabv3plus backbone=resnet50 trainer.precision=bf16-mixed
              --output "$OUT_DIR/benchmarks.md")
if [ $DRY_RUN = 1 ]; then
    BENCH_COMMON+=(backbone.name=test_resnet trainer.accelerator=cpu trainer.precision=32 trainer.batch_size=2
                   trainer.num_workers=0 dataset.image_size=[32,32] --windows 1 --steps 1 --warmup 0)
    SIZE_512=(dataset.train_size=8 dataset.val_size=4)  # the synthetic set at the tiny size above
    SIZE_CAMVID=(dataset=camvid "dataset.root=$DATA" dataset.image_size=[32,32])
    CUDA_NOTE="no CUDA (dry run): tiny sizes on the CPU"
else
    BENCH_COMMON+=(--windows 3 --steps 10 --warmup 3)
    SIZE_512=(dataset.image_size=[512,512] dataset.train_size=256 dataset.val_size=16)
    SIZE_CAMVID=(dataset=camvid "dataset.root=$DATA")
    CUDA_NOTE=""
fi

bench() {  # bench LABEL OVERRIDES...
    local label=$1
    shift
    local limit
    limit=$(budget 45 200)
    if [ "$limit" -lt 15 ]; then
        row "(b) $label" "skipped" "no time left before the deadline" 0
        return
    fi
    run_timed "$limit" "$WORK/bench.txt" "$PY" scripts/benchmark.py "${BENCH_COMMON[@]}" "$@"
    local status=$?
    local result
    result=$("$PY" - "$WORK/bench.txt" <<'EOF'
import re, sys
text = open(sys.argv[1]).read().split("\n### ")[-1]  # this run's section
rows = {m[1].split(":")[0]: (float(m[2]), m[3].strip()) for m in
        re.finditer(r"^\| ([^|]+) \| ([\d.]+) \| [^|]+ \| ([^|]+) \|$", text, re.M)}
ratios = re.search(r"segkit / ceiling = \*\*([\d.]+)\*\*.*segkit / reference = \*\*([\d.]+)\*\*", text)
if not rows or not ratios:
    sys.exit("no result table")
parts = [f"{name} {rows[name][0]:.1f} img/s ({rows[name][1]})" for name in ("ceiling", "segkit", "reference")
         if name in rows]
print(f"segkit/ceiling **{ratios[1]}**, segkit/reference **{ratios[2]}**; " + "; ".join(parts))
EOF
)
    if [ $status = 0 ] && [ -n "$result" ] && [ -n "$CUDA_NOTE" ]; then
        row "(b) $label" "skipped CUDA" "$CUDA_NOTE; $result" "$STEP_SECONDS"
    elif [ $status = 0 ] && [ -n "$result" ]; then
        row "(b) $label" "ok" "$result" "$STEP_SECONDS"
    elif [ $status = 124 ]; then
        row "(b) $label" "TIMEOUT" "stopped after ${limit} s" "$STEP_SECONDS"
    else
        row "(b) $label" "FAILED" "exit $status; see log.txt" "$STEP_SECONDS"
    fi
}

bench "512x512, DataLoader" "${SIZE_512[@]}"
bench "512x512, cache=device" "${SIZE_512[@]}" dataset.cache=device
if [ -d "$DATA/train" ]; then
    bench "CamVid 360x480, DataLoader" "${SIZE_CAMVID[@]}"
    bench "CamVid 360x480, cache=device" "${SIZE_CAMVID[@]}" dataset.cache=device
else
    row "(b) CamVid" "skipped" "no CamVid at $DATA (make gpu-pack, or --data DIR)" 0
fi

# ---------------------------------------------------------------------------- (c) CamVid from scratch
RUN_DIR=$WORK/camvid_run
[ $DRY_RUN = 1 ] && TRAIN_STEPS=2
TRAIN=(train.py experiment=camvid_scratch_unet "dataset.root=$DATA" dataset.cache=device logger=none
       trainer.progress_bar=false "trainer.max_steps=$TRAIN_STEPS" trainer.max_epochs=1000000
       "hydra.run.dir=$RUN_DIR")
EVALUATE=(-m segkit.cli.evaluate "checkpoint=$RUN_DIR/checkpoints/last.pt" "output_dir=$RUN_DIR/eval"
          progress_bar=false report=false save_masks=false)
if [ $DRY_RUN = 1 ]; then
    TRAIN+=(backbone.name=test_resnet trainer.accelerator=cpu trainer.precision=32 trainer.batch_size=2
            trainer.val_batch_size=2 trainer.num_workers=0 dataset.image_size=[32,32] augmentation.crop_size=[32,32]
            trainer.val_every_n_epochs=1 scheduler.warmup_steps=0)
    EVALUATE+=(device=cpu)
fi
train_s=$(budget 180 40)  # 40 s for start-up and the final evaluation
if [ ! -d "$DATA/train" ]; then
    row "(c) CamVid from scratch" "skipped" "no CamVid at $DATA (make gpu-pack, or --data DIR)" 0
elif [ "$train_s" -lt 30 ]; then
    row "(c) CamVid from scratch" "skipped" "no time left before the deadline" 0
else
    # SIGTERM at the time box: the trainer stops after its current step and saves last.pt (exit 130).
    STEP_START=$(date +%s)
    timeout --signal=TERM --preserve-status --kill-after=30 "$train_s" "$PY" "${TRAIN[@]}"
    train_status=$?
    train_seconds=$(($(date +%s) - STEP_START))
    cp "$RUN_DIR/epochs.csv" "$OUT_DIR/train_epochs.csv" 2>/dev/null
    cp "$RUN_DIR/metrics.json" "$OUT_DIR/train_metrics.json" 2>/dev/null
    if [ -f "$RUN_DIR/checkpoints/last.pt" ]; then
        eval_s=$(budget 60 0)
        run_timed "$eval_s" "$WORK/eval.txt" "$PY" "${EVALUATE[@]}"
        eval_status=$?
        cp "$RUN_DIR/eval/metrics.json" "$OUT_DIR/evaluate_metrics.json" 2>/dev/null
    else
        eval_status=1
    fi
    result=$("$PY" - "$RUN_DIR" "$train_seconds" "$TRAIN_STEPS" <<'EOF'
import json, sys
from pathlib import Path
run, seconds, planned = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
train = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
steps = train.get("steps", 0)
text = f"{steps}/{planned} steps in {seconds} s ({steps / max(seconds, 1):.2f} steps/s incl. start-up), " \
       f"{train.get('status', 'no run record')}"
if train.get("stop_reason"):
    text += f" ({train['stop_reason']}: the time box; --train-steps sizes the schedule)"
scores = run / "eval" / "metrics.json"
if scores.is_file():
    scored = json.loads(scores.read_text())
    protocol = scored.get("protocol", "segkit-evaluate default")
    text += f"; val mIoU of last.pt **{scored['miou']:.4f}** ({scored['images']} images, {protocol})"
print(text)
EOF
)
    if [ "$train_status" != 0 ] && [ "$train_status" != 130 ] && [ "$train_status" != 143 ]; then
        status_word="FAILED"
        result="exit $train_status; $result"
    elif [ "$eval_status" != 0 ]; then
        status_word="FAILED (evaluate)"
    elif [ "$HAVE_CUDA" != 1 ]; then
        status_word="skipped CUDA"
        result="no CUDA (dry run): tiny sizes on the CPU; $result"
    else
        status_word="ok"
    fi
    row "(c) CamVid from scratch" "$status_word" "$result" "$train_seconds"
fi

rm -rf "$WORK"
echo
cat "$SUMMARY"
