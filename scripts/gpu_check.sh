#!/usr/bin/env bash
# The first GPU run, prepared: one command for a bare GPU machine (no network), hard deadline 8 minutes wall.
#
#   make gpu-pack                        # here: wheels the GPU image lacks + CamVid, in .gpu-pack/ (~52 MiB)
#   bash scripts/gpu_check.sh            # there, from the checkout, with .gpu-pack carried along
#   bash scripts/gpu_check.sh --dry-run  # anywhere: the same steps, the same entry points, on the CPU at tiny sizes
#
# A dry run swaps the device (cuda -> cpu) and the sizes, nothing else: same commands, same configs, same
# precision, same files written. What it cannot prove is the device itself.
#
# Steps, each under what is left of the deadline (a step that would not fit is skipped, saying so):
#   install   pip install --no-index --no-deps the pack's wheels into a private folder (first on PYTHONPATH)
#   versions  scripts/gpu_versions.py: torch, CUDA, cuDNN, driver, GPU, libraries, segkit commit -> versions.json
#   (a) tests SEGKIT_TEST_DEVICES=<device> pytest tests/test_cuda.py tests/test_devices.py: the CUDA-only tests
#             (nvjpeg, memory statistics + OOM, NCCL, sync-debug mode), then the device suite on the device
#   (b) bench scripts/benchmark.py train, deeplabv3plus + resnet50, bf16: 512x512 and CamVid size (and CamVid
#             from dataset.cache=device): ceiling, segkit, bare loop, reference images/s, peak memory, ratios
#   (c) train CamVid from scratch (experiment=camvid_scratch_unet, dataset.cache=device), time-boxed (SIGTERM =
#             the trainer's own graceful stop), then segkit-evaluate on last.pt (native-resolution scoring)
# Output, one folder ($OUT, or --out DIR; at most 8 plain files): summary.md (the table, also printed last),
# versions.json, log.txt (everything), tests.txt, benchmarks.md, train_epochs.csv, train_metrics.json,
# evaluate_metrics.json.
#
# Options: --dry-run  --out DIR  --pack DIR (default .gpu-pack)  --data DIR (CamVid root; default <pack>/camvid,
#          else ../shared/datasets/camvid)  --train-steps N (the schedule's length, default 1500)
#          --deadline SECONDS (default 480)  --commit SHA (the segkit commit, where the checkout has no .git)
set -uo pipefail
cd "$(dirname "$0")/.."

ARGS=("$@")
DRY_RUN=0
OUT_DIR=${OUT:-gpu-check-out}
PACK=.gpu-pack
DATA=""
TRAIN_STEPS=1500
DEADLINE_S=480
COMMIT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT_DIR=$2; shift ;;
        --pack) PACK=$2; shift ;;
        --data) DATA=$2; shift ;;
        --train-steps) TRAIN_STEPS=$2; shift ;;
        --deadline) DEADLINE_S=$2; shift ;;
        --commit) COMMIT=$2; shift ;;
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

# ---------------------------------------------------------------------------- the one difference: the device
if [ $DRY_RUN = 1 ]; then
    DEVICE=cpu
    export CUDA_VISIBLE_DEVICES=""  # the CPU, also where a GPU is present
else
    DEVICE=cuda
fi
# Tiny sizes for the dry run; each list is appended after the real run's own overrides.
if [ $DRY_RUN = 1 ]; then
    TINY_BENCH=(backbone.name=test_resnet trainer.batch_size=2 trainer.num_workers=0 --windows 1 --steps 1 --warmup 0)
    SIZE_512=(dataset.image_size=[32,32] dataset.train_size=8 dataset.val_size=4)  # the synthetic set, tiny
    SIZE_CAMVID=(dataset.image_size=[32,32])
    TINY_TRAIN=(backbone.name=test_resnet trainer.batch_size=2 trainer.val_batch_size=2 trainer.num_workers=0
                dataset.image_size=[32,32] augmentation.crop_size=[32,32] scheduler.warmup_steps=0)
    TRAIN_STEPS=2
    TEST_SELECTION=(-m "not slow")  # torch.compile's CPU build takes minutes on a small machine; CUDA runs it
else
    TINY_BENCH=()
    SIZE_512=(dataset.image_size=[512,512] dataset.train_size=256 dataset.val_size=16)  # the synthetic set
    SIZE_CAMVID=()  # the files' own 360x480
    TINY_TRAIN=()
    TEST_SELECTION=()
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
    printf '| %s | %s | %s | %s | %s |\n' "$1" "$DEVICE" "$2" "$3" "$4" >> "$SUMMARY"
    printf '== %s on %s: %s (%s) %s s\n' "$1" "$DEVICE" "$2" "$3" "$4"
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

# ---------------------------------------------------------------------------- install + versions
if [ $DRY_RUN = 1 ]; then
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
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 SEGKIT_TEST_DEVICES=$DEVICE
[ -n "${COMMIT:-}" ] && export SEGKIT_COMMIT=$COMMIT  # the benchmark tables name the commit too
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS for the exact-resume tests

versions=$("$PY" scripts/gpu_versions.py "$OUT_DIR" --pack "$PACK" ${COMMIT:+--commit "$COMMIT"})
versions_status=$?
{
    echo "# GPU check $(date -u '+%Y-%m-%d %H:%M UTC')$([ $DRY_RUN = 1 ] && echo ' (dry run)')"
    echo
    echo "\`bash scripts/gpu_check.sh ${ARGS[*]}\` on $(hostname), device $DEVICE, deadline ${DEADLINE_S} s"
    echo
    echo "${versions:-versions: scripts/gpu_versions.py failed (exit $versions_status)}"
    echo
    printf '| step | device | status | result | seconds |\n| --- | --- | --- | --- | --- |\n'
} > "$SUMMARY"
row "install" "${INSTALL[0]}" "${INSTALL[1]}" 0
if [ $versions_status = 0 ]; then
    row "versions" "ok" "versions.json" 0
else
    row "versions" "FAILED" "exit $versions_status; see log.txt" 0
fi
HAVE_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ $DRY_RUN = 0 ] && [ "$HAVE_CUDA" != 1 ]; then
    echo "warning: no CUDA device visible: the CUDA steps will fail (trainer.accelerator=cuda)"
fi

# ---------------------------------------------------------------------------- (a) tests on the device
limit=$(budget 150 315)  # 315 s: the benchmarks and the training after it
# The CUDA-only tests first, then the device suite (torch.compile, the slowest, in it). -vv on top of pyproject's
# -q: one line per test, so a run stopped at its limit still says which tests passed.
run_timed "$limit" "$OUT_DIR/tests.txt" "$PY" -m pytest tests/test_cuda.py tests/test_devices.py \
    "${TEST_SELECTION[@]}" -p no:cacheprovider -vv -rfEs
status=$?
counts=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)' "$OUT_DIR/tests.txt" | tail -1 | tr -d '=' | sed -E 's/^ +| +$//g')
failed=$(grep -oE '^(FAILED|ERROR) [^ ]+' "$OUT_DIR/tests.txt" | sed -E 's/^[A-Z]+ tests\///' | head -5 | paste -sd ' ' -)
if [ $status = 0 ]; then
    row "(a) tests/test_devices.py + tests/test_cuda.py" "ok" "${counts:-no summary line}" "$STEP_SECONDS"
elif [ $status = 124 ]; then
    row "(a) tests/test_devices.py + tests/test_cuda.py" "TIMEOUT" "stopped after ${limit} s; see tests.txt" \
        "$STEP_SECONDS"
else
    row "(a) tests/test_devices.py + tests/test_cuda.py" "FAILED" "${counts:-exit $status}: ${failed:-see tests.txt}" \
        "$STEP_SECONDS"
fi

# ---------------------------------------------------------------------------- (b) benchmarks
BENCH_COMMON=(train trainer=gpu "trainer.accelerator=$DEVICE" model=deeplabv3plus backbone=resnet50
              trainer.precision=bf16-mixed --output "$OUT_DIR/benchmarks.md" --windows 3 --steps 8 --warmup 3)

bench() {  # bench RESERVE LABEL OVERRIDES...: RESERVE seconds are kept for the steps after it
    local reserve=$1 label=$2
    shift 2
    local limit
    limit=$(budget 50 "$reserve")
    if [ "$limit" -lt 15 ]; then
        row "(b) $label" "skipped" "no time left before the deadline" 0
        return
    fi
    run_timed "$limit" "$WORK/bench.txt" "$PY" scripts/benchmark.py "${BENCH_COMMON[@]}" "${TINY_BENCH[@]}" "$@"
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
parts = [f"{name} {rows[name][0]:.1f} img/s" for name in ("ceiling", "segkit", "reference") if name in rows]
print(f"segkit/ceiling **{ratios[1]}**, segkit/reference **{ratios[2]}**; " + ", ".join(parts)
      + f"; peak memory (segkit) {rows['segkit'][1]}")
EOF
)
    if [ $status = 0 ] && [ -n "$result" ]; then
        row "(b) $label" "ok" "$result" "$STEP_SECONDS"
    elif [ $status = 124 ]; then
        row "(b) $label" "TIMEOUT" "stopped after ${limit} s" "$STEP_SECONDS"
    else
        row "(b) $label" "FAILED" "exit $status; see log.txt" "$STEP_SECONDS"
    fi
}

# Reserves: 165 s for (c), 50 s for each benchmark still to come.
bench 265 "DeepLabV3+ R50 bf16, 512x512, DataLoader" "${SIZE_512[@]}"
if [ -d "$DATA/train" ]; then
    bench 215 "DeepLabV3+ R50 bf16, CamVid 360x480, DataLoader" dataset=camvid "dataset.root=$DATA" "${SIZE_CAMVID[@]}"
    bench 165 "DeepLabV3+ R50 bf16, CamVid 360x480, cache=device" dataset=camvid "dataset.root=$DATA" dataset.cache=device \
        "${SIZE_CAMVID[@]}"
else
    row "(b) DeepLabV3+ R50 bf16, CamVid 360x480" "skipped" "no CamVid at $DATA (make gpu-pack, or --data DIR)" 0
fi

# ---------------------------------------------------------------------------- (c) CamVid from scratch
RUN_DIR=$WORK/camvid_run
TRAIN=(train.py experiment=camvid_scratch_unet "trainer.accelerator=$DEVICE" "dataset.root=$DATA"
       dataset.cache=device logger=none trainer.progress_bar=false "trainer.max_steps=$TRAIN_STEPS"
       trainer.max_epochs=1000000 trainer.val_every_n_epochs=25 "hydra.run.dir=$RUN_DIR" "${TINY_TRAIN[@]}")
EVALUATE=(-m segkit.cli.evaluate "checkpoint=$RUN_DIR/checkpoints/last.pt" "output_dir=$RUN_DIR/eval"
          "device=$DEVICE" progress_bar=false report=false save_masks=false)
train_s=$(budget 125 45)  # 45 s for the final evaluation
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
        eval_s=$(budget 45 0)
        run_timed "$eval_s" "$WORK/eval.txt" "$PY" "${EVALUATE[@]}"
        eval_status=$?
        cp "$RUN_DIR/eval/metrics.json" "$OUT_DIR/evaluate_metrics.json" 2>/dev/null
    else
        eval_status=1
    fi
    result=$("$PY" - "$RUN_DIR" "$train_seconds" "$TRAIN_STEPS" <<'EOF'
import csv, json, sys
from pathlib import Path
run, seconds, planned = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
train = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
steps = train.get("steps", 0)
text = f"{steps}/{planned} steps in {seconds} s ({steps / max(seconds, 1):.2f} steps/s incl. start-up), " \
       f"{train.get('status', 'no run record')}"
if train.get("stop_reason"):
    text += f" ({train['stop_reason']}: the time box; --train-steps sizes the schedule)"
if (run / "epochs.csv").is_file():
    peaks = [float(r["train/peak_memory_gib"]) for r in csv.DictReader(open(run / "epochs.csv"))
             if r.get("train/peak_memory_gib")]
    text += f"; peak memory {max(peaks):.2f} GiB" if peaks else "; peak memory n/a (CPU)"
scores = run / "eval" / "metrics.json"
if scores.is_file():
    scored = json.loads(scores.read_text())
    protocol = scored.get("scored_at", "segkit-evaluate's default")
    text += f"; val mIoU of last.pt **{scored['miou']:.4f}** ({scored['images']} images, scored at {protocol})"
print(text)
EOF
)
    if [ "$train_status" != 0 ] && [ "$train_status" != 130 ] && [ "$train_status" != 143 ]; then
        status_word="FAILED"
        result="exit $train_status; $result"
    elif [ "$eval_status" != 0 ]; then
        status_word="FAILED (evaluate)"
    else
        status_word="ok"
    fi
    row "(c) CamVid from scratch" "$status_word" "$result" "$train_seconds"
fi

rm -rf "$WORK"
echo
cat "$SUMMARY"
