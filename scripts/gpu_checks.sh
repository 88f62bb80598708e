#!/usr/bin/env bash
# Every check that needs a GPU, in one command with one time budget: a session that is lent a GPU
# for a few minutes runs this once and reads the files it leaves (at most 8, all in --out).
set -euo pipefail

prog=$(basename "$0")
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $prog --data ARCHIVE_OR_FOLDER --out DIR [--device cuda] [--budget_s 560] [--workers 6] [--smoke]

Runs, in this order, each under what is left of the time budget:
  1. env.txt            nvidia-smi, Python, torch and the git commit
  2. bench.txt/.json    scripts/benchmark.py at batch 512 on the data: the project's step with each
                        option combination (--compare_options, torch.compile included) against the
                        PIL + DataLoader reference (--workers per loader), the host-sync check and
                        the feature losses' peak memory (at most 150 s)
  3. train_eager.log,   the paper's 200-epoch Hybrid-SC on CIFAR-10-LT, imbalance ratio 100, with
     results_eager.json main.py's defaults (at most 240 s)
  4. train_compile.log, the same with --compile (whatever time is left); results.json's
     results_compile.json first_step_s holds the compilation, train_time_s the rest
  5. summary.md         scripts/summarize.py over both runs
A step that fails or runs out of time is reported and the next one still runs; a step with
less than 30 s left is skipped. Exits 1 if any step failed, was cut off or skipped.

  --data P       CIFAR-10 as a train/<class>/ + test/<class>/ folder (or cifar-10-batches-py/),
                 or a .tar.gz of one (e.g. cifar10-jpeg.tar.gz), unpacked into a scratch folder
  --out DIR      where the files above go (created; must be empty or absent)
  --device D     cuda (default) or cpu
  --budget_s S   seconds for all steps together (default: 560)
  --workers N    DataLoader workers per loader of the benchmark's reference pipeline (default: 6)
  --smoke        tiny settings (1 epoch, resnet20, a few benchmark steps, no compile): checks this
                 script itself in seconds, on a CPU
  -h, --help     this message

Python: \${PYTHON:-python3}. Run folders and the unpacked data go to a scratch folder that is
removed at the end; only --out is kept.
EOF
}

die_usage() {
  echo "$prog: error: $1 (see --help)" >&2
  exit 2
}

data="" out="" device="cuda" budget_s=560 workers=6 smoke=0
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --smoke) smoke=1; shift ;;
    --data=* | --out=* | --device=* | --budget_s=* | --workers=*)
      name=${1%%=*}; set -- "$name" "${1#*=}" "${@:2}"; continue ;;
    --data | --out | --device | --budget_s | --workers)
      (($# >= 2)) || die_usage "$1 needs a value"
      case $1 in
        --data) data=$2 ;;
        --out) out=$2 ;;
        --device) device=$2 ;;
        --budget_s) budget_s=$2 ;;
        --workers) workers=$2 ;;
      esac
      shift 2 ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
done
[[ -n $data ]] || die_usage "--data is required"
[[ -n $out ]] || die_usage "--out is required"
[[ -e $data ]] || die_usage "--data '$data' does not exist"
[[ $device == cuda || $device == cpu ]] || die_usage "--device must be cuda or cpu, got '$device'"
[[ $budget_s =~ ^[0-9]+$ ]] || die_usage "--budget_s must be a whole number of seconds, got '$budget_s'"
[[ $workers =~ ^[0-9]+$ ]] || die_usage "--workers must be a whole number, got '$workers'"
if [[ -e $out && -n $(ls -A "$out" 2>/dev/null) ]]; then
  die_usage "--out '$out' is not empty: give a new folder (nothing there was touched)"
fi

python=${PYTHON:-python3}
data="$(cd "$(dirname "$data")" && pwd)/$(basename "$data")"  # before the cd below
mkdir -p "$out"
out=$(cd "$out" && pwd)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
cd "$repo_root"

if [[ -d $data ]]; then
  data_root=$(cd "$data" && pwd)
else
  tar -xzf "$data" -C "$scratch" || { echo "$prog: error: cannot unpack '$data'" >&2; exit 2; }
  # The folder that holds train/ (the image-folder layout) or cifar-10-batches-py/.
  marker=$(find "$scratch" -maxdepth 3 \( -name train -type d -o -name cifar-10-batches-py -type d \) | head -n 1)
  [[ -n $marker ]] || { echo "$prog: error: '$data' holds no CIFAR-10 layout" >&2; exit 2; }
  data_root=$(dirname "$marker")
fi

start=$SECONDS
statuses=()
any_failed=0

# run_step NAME CAP LOG -- CMD...: CMD under min(CAP, budget left) seconds, output to LOG.
run_step() {
  local name=$1 cap=$2 log=$3
  shift 4
  local left=$((budget_s - (SECONDS - start)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 30)); then
    statuses+=("$name: skipped (${left}s of the budget left)")
    any_failed=1
    echo "== $name: skipped, ${left}s of the budget left"
    return
  fi
  echo "== $name (at most ${limit}s): $*"
  local t0=$SECONDS rc=0
  PYTHONUNBUFFERED=1 timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
  local took=$((SECONDS - t0))
  if ((rc == 0)); then
    statuses+=("$name: ok (${took}s)")
  elif ((rc == 124 || rc == 137)); then
    statuses+=("$name: CUT OFF after ${took}s (limit ${limit}s)")
    any_failed=1
  else
    statuses+=("$name: FAILED, exit $rc after ${took}s")
    any_failed=1
  fi
  echo "   ${statuses[-1]}"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo none)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
  echo "data: $data_root"
  "$python" -c 'import sys, torch, torchvision; print("python", sys.version.split()[0]); print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); torch.cuda.is_available() and print("gpu", torch.cuda.get_device_name(0))' 2>&1 || true
  nproc 2>/dev/null | sed 's/^/cpu cores: /'
  command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 || echo "nvidia-smi: not found"
} >"$out/env.txt"

if ((smoke)); then
  run_args=(--model resnet20 --batch_size 16 --epochs 1 --lr_decay_epochs "" --imb_factor 0.1)
  bench_args=(--model resnet20 --batch_size 16 --steps 2 --warmup_steps 1 --imb_factor 0.1 --memory_batch_sizes "")
else
  run_args=()
  bench_args=(--batch_size 512 --steps 50 --warmup_steps 10 --compare_options)
fi

run_step benchmark 150 "$out/bench.txt" -- "$python" scripts/benchmark.py --device "$device" \
  --data_root "$data_root" --workers "$workers" --json "$out/bench.json" "${bench_args[@]}"

variants=(eager)
((smoke)) || variants+=(compile)
for variant in "${variants[@]}"; do
  extra=()
  [[ $variant == compile ]] && extra=(--compile)
  run_dir="$scratch/runs/sc_$variant"
  cap=$([[ $variant == eager ]] && echo 240 || echo "$budget_s")
  run_step "train_$variant" "$cap" "$out/train_$variant.log" -- "$python" main.py --data_root "$data_root" \
    --device "$device" --loss sc --output_dir "$run_dir" --print_freq 24 "${run_args[@]}" "${extra[@]}"
  if [[ -f $run_dir/results.json ]]; then
    cp "$run_dir/results.json" "$out/results_$variant.json"
  fi
done

if [[ -d $scratch/runs ]] && "$python" scripts/summarize.py "$scratch/runs" >"$out/summary.md" 2>&1; then
  :
else
  echo "no finished run to summarise" >>"$out/summary.md"
fi

echo "== done in $((SECONDS - start))s; files in $out:"
printf '   %s\n' "${statuses[@]}"
ls "$out" | sed 's/^/   /'
exit "$any_failed"
