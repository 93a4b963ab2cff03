#!/usr/bin/env bash
# polydiff's GPU checks in one command (about 9 minutes on one H200).
#
# Run from anywhere (it changes to the repository root). On the GPU machine, with .whl/ beside the code
# (benchmarks/device/fetch_wheels.sh fills it) and OUT naming the results folder:
#
#   OUT=/path/to/results bash benchmarks/device/check.sh
#
# A CPU dry run with tiny sizes, to validate the script without a GPU (a few minutes):
#
#   DEVICE=cpu TINY=1 OUT=/tmp/devcheck OMP_NUM_THREADS=1 bash benchmarks/device/check.sh
#
# Steps, most valuable first, each under its own `timeout` capped by what is left of BUDGET_S, so a
# slow or failing step cannot eat the others' time (a step with too little time left is skipped):
#   a  bench_unet.py --bf16: the shared U-Net vs lucidrains' Unet1D (16 x 1 x 16,000) and vs
#      diffusers' UNet2DModel (32 x 3 x 32 x 32), eager, matched parameter counts
#   b  bench_egnn.py: EGNN vs egnn-pytorch forward + backward, the edge-list vs dense layout, sampling
#   c  recipes/audio_unet.yaml GPU defaults (16 kHz, 49.2M parameters, batch 32, bf16) for TRAIN_STEPS
#      steps (stopped with Ctrl-C and a checkpoint at TRAIN_CAP_S), then `polydiff sample --eval`
#      DDIM-SAMPLE_STEPS of SAMPLE_N clips, guidance GUIDANCE, with the real-data reference row
#   d  bench_audio_sampling.py: seconds of audio per second, DDPM-200 / DDIM-50 / DPM-Solver++-20
#   e  bench_unet.py --bf16 --compile --only 1d     (if the budget still allows)
#   f  bench_egnn.py --only compile                 (if the budget still allows)
#   g  bench_unet.py --bf16 --compile --only 2d     (if the budget still allows)
#
# Results, at most 8 files in $OUT (rewritten after every step, so a call cut short keeps what ran):
#   check.log                  everything printed (this script's output, tee'd)
#   summary.md                 step table (status, exit code, seconds) and the headline figures
#   env.json                   GPU, driver, torch/CUDA/cuDNN, carried package versions, settings, steps
#   unet.json                  {"bf16": a, "compile_1d": e, "compile_2d": g}: bench_unet.py's JSON each
#   egnn.json                  {"eager": b, "compile": f}: bench_egnn.py's JSON each
#   audio_train_metrics.jsonl  step c's metrics.jsonl (loss, lr, grad norm, clips/s every LOG_EVERY steps)
#   audio_sampling.json        step c's sampling.json (metrics and the real-data reference row)
#   audio_sampling_bench.json  step d's JSON
#
# It writes nowhere but /tmp and $OUT: the work folder WORK (under /tmp), the wheels' install folder
# /tmp/site, and HOME and every cache (Inductor, Triton, CUDA, matplotlib, metric classifiers)
# pointed into WORK; no byte-code is written into the repository.
#
# Settings (environment variables; defaults for the GPU run, TINY=1 ones in brackets):
#   DEVICE=cuda [cpu]   TINY=0|1   BUDGET_S=520 (the whole script, wheel install included)
#   STEPS="a b c d e f g"  (run a subset, e.g. STEPS="c" to redo the training alone)
#   TRAIN_STEPS=4000 [30]  TRAIN_CAP_S=240  LOG_EVERY=100 [10]
#   SAMPLE_N=100 [20]  SAMPLE_STEPS=50 [10]  GUIDANCE=3
#   WORK=/tmp/devcheck-work  INSTALL_WHEELS=auto (auto: only where python3 is 3.12, as the wheels)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
REPO=$PWD
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
OUT=${OUT:-/tmp/devcheck-out}
WORK=${WORK:-/tmp/devcheck-work}
BUDGET_S=${BUDGET_S:-520}
STEPS=${STEPS:-a b c d e f g}
INSTALL_WHEELS=${INSTALL_WHEELS:-auto}
GUIDANCE=${GUIDANCE:-3}
TRAIN_CAP_S=${TRAIN_CAP_S:-240}
if [ "$TINY" = 1 ]; then
  TRAIN_STEPS=${TRAIN_STEPS:-30}; LOG_EVERY=${LOG_EVERY:-10}; SAMPLE_N=${SAMPLE_N:-20}; SAMPLE_STEPS=${SAMPLE_STEPS:-10}
else
  # The audio recipe's step: 38 GFLOP forward per 1 s clip (49.2M parameters, counted with
  # torch.utils.flop_counter), about 3.6 TFLOP per batch of 32 forward + backward. At ~80-120 TFLOP/s
  # achieved in eager bf16 (1-D convolutions, GroupNorm and SiLU, one sync per step) that is
  # ~30-45 ms a step: 4,000 steps ~ 2-3 minutes. TRAIN_CAP_S stops it with a checkpoint if slower.
  TRAIN_STEPS=${TRAIN_STEPS:-4000}; LOG_EVERY=${LOG_EVERY:-100}; SAMPLE_N=${SAMPLE_N:-100}; SAMPLE_STEPS=${SAMPLE_STEPS:-50}
fi
RESERVE_S=10  # kept back at the end for the last collect

case "$WORK" in
  /tmp/?*) ;;
  *) echo "check.sh: WORK must be a folder under /tmp, got $WORK" >&2; exit 2 ;;
esac
if [ -e "$WORK" ] && [ ! -e "$WORK/.devcheck" ]; then
  echo "check.sh: $WORK exists and is not this script's work folder (no .devcheck marker); choose another WORK" >&2
  exit 2
fi
rm -rf "$WORK"  # a fresh run folder: polydiff train would otherwise resume an earlier run's last.pt
mkdir -p "$WORK/parts" "$WORK/home" "$OUT" || exit 2
touch "$WORK/.devcheck"
rm -f "$OUT"/{check.log,summary.md,env.json,unet.json,egnn.json,audio_train_metrics.jsonl,audio_sampling.json,audio_sampling_bench.json}

export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MPLBACKEND=Agg
export HOME=$WORK/home XDG_CACHE_HOME=$WORK/cache MPLCONFIGDIR=$WORK/mpl POLYDIFF_CACHE=$WORK/polydiff-cache
export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor TRITON_CACHE_DIR=$WORK/triton CUDA_CACHE_PATH=$WORK/nv
export TORCH_HOME=$WORK/torch HF_HOME=$WORK/hf HF_HUB_OFFLINE=1 NUMBA_CACHE_DIR=$WORK/numba
export DEVCHECK_DEVICE=$DEVICE DEVCHECK_TINY=$TINY DEVCHECK_BUDGET_S=$BUDGET_S DEVCHECK_STEPS="$STEPS"
export DEVCHECK_TRAIN_STEPS=$TRAIN_STEPS DEVCHECK_TRAIN_CAP_S=$TRAIN_CAP_S DEVCHECK_SAMPLE_N=$SAMPLE_N
export DEVCHECK_SAMPLE_STEPS=$SAMPLE_STEPS DEVCHECK_GUIDANCE=$GUIDANCE

T0=$(date +%s)
DEADLINE=$((T0 + BUDGET_S))
STEPS_TSV=$WORK/parts/steps.tsv
RUN=$WORK/run_audio
PARTS=$WORK/parts

collect() {
  python3 "$REPO/benchmarks/device/collect.py" --work "$WORK" --out "$OUT" --run "$RUN" >/dev/null 2>"$WORK/collect.err" ||
    { echo "[check] collect.py failed:"; cat "$WORK/collect.err"; }
}

# step ID NAME CAP_S MIN_S FUNCTION: runs FUNCTION with CAP (seconds it may take) when ID is in STEPS
# and at least MIN_S seconds are left; records status, exit code and wall time, then collects.
step() {
  local id=$1 name=$2 cap=$3 min=$4 fn=$5 left rc status t1 t2 wall
  if [[ " $STEPS " != *" $id "* ]]; then
    printf '%s\t%s\t%s\t%s\t%s\n' "$id" "$name" "not requested (STEPS)" "" "0" >>"$STEPS_TSV"
    return 0
  fi
  left=$((DEADLINE - $(date +%s) - RESERVE_S))
  if [ "$left" -lt "$min" ]; then
    echo "=== [$id] $name: skipped, ${left} s left of BUDGET_S=$BUDGET_S (needs ${min} s)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$id" "$name" "skipped: ${left} s left, needs ${min} s" "" "0" >>"$STEPS_TSV"
    collect
    return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  CAP=$cap
  echo
  echo "=== [$id] $name: start $(date +%H:%M:%S), limit ${cap} s, $((DEADLINE - $(date +%s))) s of the budget left"
  t1=$(date +%s.%N)
  "$fn"
  rc=$?
  t2=$(date +%s.%N)
  wall=$(awk -v a="$t1" -v b="$t2" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out (limit ${cap} s)" ;;
    *) status="failed" ;;
  esac
  [ -n "${STEP_NOTE:-}" ] && status="$status; $STEP_NOTE"
  STEP_NOTE=
  echo "=== [$id] $name: $status, exit $rc, ${wall} s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$id" "$name" "$status" "$rc" "$wall" >>"$STEPS_TSV"
  collect
  return 0
}

# ------------------------------------------------------------------------------------ the steps
setup() {
  local site_path=""
  if [ "$INSTALL_WHEELS" != 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    if [ "$INSTALL_WHEELS" = 1 ] || python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
      echo "[setup] installing $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
      if timeout -k 10 "$CAP" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
          --target /tmp/site .whl/*.whl; then
        site_path=/tmp/site
      else
        echo "[setup] wheel install FAILED: the steps that need them will fail"
        STEP_NOTE="wheel install failed"
      fi
    else
      echo "[setup] .whl/ holds Python 3.12 wheels and python3 is $(python3 -V 2>&1): not installed" \
           "(INSTALL_WHEELS=1 forces it); using this environment's packages"
    fi
  else
    echo "[setup] no wheels installed (INSTALL_WHEELS=$INSTALL_WHEELS, .whl/ $( [ -d .whl ] && echo present || echo absent ))"
  fi
  export PYTHONPATH="${site_path:+$site_path:}$REPO${PYTHONPATH:+:$PYTHONPATH}"
  echo "[setup] PYTHONPATH=$PYTHONPATH"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit \
      --format=csv >"$PARTS/nvidia_smi.csv" 2>&1
    cat "$PARTS/nvidia_smi.csv"
  else
    echo "[setup] no nvidia-smi here"
  fi
  timeout -k 10 "$CAP" python3 "$REPO/benchmarks/device/collect.py" --facts "$PARTS/env_facts.json"
}

unet_bf16() {
  local size=()
  [ "$TINY" = 1 ] && size=(--quick --steps 2 --warmup 1)
  timeout -k 20 "$CAP" python3 benchmarks/bench_unet.py --device "$DEVICE" --bf16 "${size[@]}" --out "$PARTS/unet_bf16.json"
}

egnn() {
  local size=()
  [ "$TINY" = 1 ] && size=(--quick --hidden 32 --layers 2 --batch 8 --sample-batch 8 --reps 2)
  timeout -k 20 "$CAP" python3 -m benchmarks.bench_egnn --device "$DEVICE" "${size[@]}" --out "$PARTS/egnn.json"
}

audio_train() {
  local start=$(date +%s) rc rc2 left cap prof=() train_cap=$TRAIN_CAP_S
  [ "$TINY" = 1 ] && prof=(profile=cpu)
  [ "$train_cap" -gt $((CAP - 60)) ] && train_cap=$((CAP - 60))  # keep a minute for the draw and its metrics
  echo "[audio] training $TRAIN_STEPS steps in $RUN (Ctrl-C with a checkpoint after ${train_cap} s)"
  # -s INT: the trainer stops after the step in progress and writes last.pt (exit 130), so the draw
  # below still runs on what was trained; -k: a stuck process is killed 60 s later.
  timeout -s INT -k 60 "$train_cap" python3 -m polydiff.cli train recipes/audio_unet.yaml "${prof[@]}" \
    hydra.run.dir="$RUN" trainer.device="$DEVICE" trainer.max_steps="$TRAIN_STEPS" trainer.log_every="$LOG_EVERY" \
    trainer.ckpt_every="$TRAIN_STEPS" trainer.keep_every=0 trainer.sample_every=0 trainer.progress=false \
    trainer.num_samples=2 trainer.eval=false
  rc=$?
  if [ "$rc" = 130 ] || [ "$rc" = 124 ]; then
    STEP_NOTE="training stopped at the ${train_cap} s cap"
  elif [ "$rc" != 0 ]; then
    STEP_NOTE="training failed (exit $rc)"
  fi
  echo "[audio] training: exit $rc after $(( $(date +%s) - start )) s"
  if [ ! -f "$RUN/checkpoints/last.pt" ]; then
    echo "[audio] no checkpoint: no draw"
    return $(( rc == 0 ? 1 : rc ))
  fi
  left=$(( CAP - ($(date +%s) - start) ))
  [ "$left" -lt 20 ] && { echo "[audio] ${left} s left: no draw"; return 124; }
  echo "[audio] DDIM-$SAMPLE_STEPS, $SAMPLE_N clips, guidance $GUIDANCE, metrics and reference row (limit ${left} s)"
  timeout -k 20 "$left" python3 -m polydiff.cli sample "$RUN" --n "$SAMPLE_N" --eval --device "$DEVICE" --out "$RUN/eval" \
    sampler.name=ddim sampler.steps="$SAMPLE_STEPS" guidance.scale="$GUIDANCE"
  rc2=$?
  [ "$rc2" != 0 ] && return "$rc2"
  [ "$rc" = 130 ] || [ "$rc" = 124 ] && return 0  # stopped at the cap by design: the draw ran
  return "$rc"
}

audio_sampling() {
  local size=()
  [ "$TINY" = 1 ] && size=(--quick --repeats 1)
  timeout -k 20 "$CAP" python3 -m benchmarks.bench_audio_sampling --device "$DEVICE" "${size[@]}" \
    --out "$PARTS/audio_sampling_bench.json"
}

# TINY: aot_eager traces (Dynamo, AOTAutograd) without Inductor's code generation, which takes minutes
# per model on a CPU core; the GPU run compiles with Inductor, as trainer.compile=true does.
unet_compile() {  # $1: 1d or 2d
  local size=()
  [ "$TINY" = 1 ] && size=(--quick --steps 2 --warmup 1 --compile-backend aot_eager)
  timeout -k 20 "$CAP" python3 benchmarks/bench_unet.py --device "$DEVICE" --bf16 --compile --only "$1" "${size[@]}" \
    --out "$PARTS/unet_compile_$1.json"
}

unet_compile_1d() { unet_compile 1d; }

egnn_compile() {
  local size=()
  [ "$TINY" = 1 ] && size=(--hidden 16 --layers 2 --batch 4 --reps 2 --compile-batches 3)
  TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 timeout -k 20 "$CAP" python3 -m benchmarks.bench_egnn --only compile \
    --device "$DEVICE" "${size[@]}" --out "$PARTS/egnn_compile.json"
}

unet_compile_2d() { unet_compile 2d; }

main() {
  echo "[check] polydiff device check: DEVICE=$DEVICE TINY=$TINY BUDGET_S=$BUDGET_S STEPS='$STEPS' OUT=$OUT WORK=$WORK"
  echo "[check] TRAIN_STEPS=$TRAIN_STEPS TRAIN_CAP_S=$TRAIN_CAP_S SAMPLE_N=$SAMPLE_N SAMPLE_STEPS=$SAMPLE_STEPS GUIDANCE=$GUIDANCE"
  STEPS="0 $STEPS"  # the set-up always runs
  #    id name                        cap  min  function
  step 0 "set-up: wheels, facts"       90   20  setup
  step a "bench_unet bf16 1-D + 2-D"  150   40  unet_bf16
  step b "bench_egnn"                 150   40  egnn
  step c "audio recipe: train + DDIM"  420  150  audio_train
  step d "bench_audio_sampling"       120   30  audio_sampling
  step e "bench_unet compile 1-D"     300   90  unet_compile_1d
  step f "bench_egnn compile"         240   90  egnn_compile
  step g "bench_unet compile 2-D"     300   90  unet_compile_2d
  collect
  echo
  cat "$OUT/summary.md" 2>/dev/null
  echo "[check] done in $(( $(date +%s) - T0 )) s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

main 2>&1 | tee -a "$OUT/check.log"
exit "${PIPESTATUS[0]}"
