#!/usr/bin/env bash
# Every check that needs a GPU, in one command with one time budget: a session that is lent a GPU
# for a few minutes runs this once and reads the few files it leaves in --out.
{ # The whole script is one compound command, which bash reads in full before running any of it: a change
  # to this file while it runs (an edit, a checkout) cannot reach the running copy, which reads no more.
set -euo pipefail

prog=$(basename "$0")
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
start=$SECONDS

usage() {
  cat <<EOF
Usage: $prog --data ARCHIVE_OR_FOLDER --out DIR [--device cuda] [--budget_s 560] [--workers 6]
       [--only STEP,...] [--smoke]

Runs these steps in order, each under its own cap and what is left of the time budget:
  decode          reads the data once (decoding JPEG files into the project's .npz cache), so that no
                  timed or capped step below spends its time there (cap 90 s)
  train_eager     the paper's 200-epoch Hybrid-SC on CIFAR-10-LT, imbalance ratio 100, main.py's
                  defaults, plus --ncm_every 10 (the nearest class mean's course, in the history:
                  20 forward passes over 22,406 images, not measured yet, outside train_time_s)
                  (cap 240 s) -> results_eager.json
  benchmark       scripts/benchmark.py at batch 512 on the data, main.py's CUDA defaults against the
                  PIL + DataLoader reference (--workers per loader), with the host-sync check, a
                  profile of the project's step by operator (--profile) and the feature losses' peak
                  memory (cap 90 s) -> bench.json
  bench_supcon    the project's step with --sc_aug supcon alone (SupContrast's augmentation of the
                  views; no reference, no memory), with the host-sync check (cap 60 s) -> bench_supcon.json
  train_eager_resumed
                  only when train_eager was cut off by its cap: the same run continued with --resume
                  (what is left; its 200-epoch result matters more than the steps below, which
                  then get what remains, train_compile nothing) -> results_eager.json
  bench_graphs    the benchmark's step compiled with --compile --compile_mode reduce-overhead (the
                  fastest on a GPU: CUDA graphs) against the reference, three times each in turn
                  (--repeats 3: each ratio and their median), with the host-sync check and the
                  profile (the graph replays' kernels show as the time outside any operator, and
                  by name in the profile's kernel table; no memory; cap 180 s, a cold compilation
                  of about 50 s included) -> bench_graphs.json. In the default budget the steps
                  after it may not get their time; --only bench_graphs,train_compile runs the
                  fastest step's ratio and its 200-epoch run alone
  bench_options   the same step with each amp x channels_last combination and torch.compile in its
                  default and reduce-overhead (CUDA graphs) modes (--compare_options, no reference, no
                  memory; cap 210 s: two cold compilations took 47 and 52 s on an H200) ->
                  bench_options.json; the compile rows' compile_s are cold compilations (an empty
                  Inductor cache)
  train_compile   train_eager with --compile --compile_mode reduce-overhead (what is left; it trained in
                  71 s against eager's 110 s on an H200, before the loss joined the compiled graph),
                  sharing bench_graphs' Inductor cache
                  (the same step, so it compiles from a warm cache, as a sweep's later runs do, when
                  bench_graphs ran); results.json's first_step_s holds that compilation, train_time_s
                  the training -> results_compile.json
  bench_joint     only when --only names it: bench_graphs' step with --bn_stats joint (one backbone pass
                  over both branches' images: other maths, the upper bound of what a one-pass
                  per-branch batch norm could gain), no reference, with the profile (cap 150 s, a cold
                  compilation into its own Inductor cache included; after train_compile, which takes
                  what it needs of the budget first) -> bench_joint.json
  table1          only when --only names it (the default budget leaves it no time): the paper's Table 1
                  on CIFAR-10-LT at the two ratios without a 200-epoch run on a GPU yet, Hybrid-SC and
                  Hybrid-PSC at imbalance ratios 50 and 10 (main.py's defaults, seed 0), through
                  scripts/sweep.sh, one run after another (SC r50, PSC r50, SC r10, PSC r10), with
                  --compile --compile_mode reduce-overhead (sharing bench_graphs' Inductor cache: Hybrid-SC
                  compiles from a warm cache when bench_graphs ran, Hybrid-PSC once from a cold one) and
                  --eval_every 5; gets what is left of the budget (about 2.5 minutes a run expected on an
                  H200: alone, --only table1, three of the four in the default budget) ->
                  table1_runs.tar.gz (each run's folder with its config.json and results.json, or its
                  last.pt if it was cut off, to continue it with --resume; a run still in its step 10 s
                  after the cap's SIGTERM, such as a first step compiling, is killed)
Then summary.md (scripts/summarize.py --per_class --per_run per run, and over the table1 runs) and log.txt: the
environment (nvidia-smi, torch, the commit) and every step's output and status. At most 8 files, all
directly in --out (so --only names at most six of the eight steps).

A step that fails or runs out of time is reported and the next one still runs; one with less
than 30 s left (3 x GPU_CHECKS_GRACE_S) is skipped; 15 s stay for the summary. Each step but train_compile and table1
compiles into its own fresh Inductor cache. Exits 1 if any step failed, was cut off or
was skipped (a step that --only leaves out is not skipped). Ctrl-C or SIGTERM sends the running
step one SIGTERM (a run saves its last.pt), runs no later step, still writes the summary, and
exits 130 or 143.

  --data P       CIFAR-10 as a train/<class>/ + test/<class>/ folder (or a folder holding
                 cifar-10-batches-py/), or a .tar.gz of one (e.g. cifar10-jpeg.tar.gz),
                 unpacked into a scratch folder
  --out DIR      where the files go (created; must be empty or absent)
  --device D     cuda (default) or cpu
  --budget_s S   seconds for everything, unpacking included (default: 560)
  --workers N    DataLoader workers per loader of the benchmark's reference, 0 to 128 (default: 6)
  --only LIST    run only these steps, comma-separated; they run in the order above whatever the
                 order given (decode always runs first;
                 e.g. --only bench_graphs,train_compile)
  --smoke        tiny settings (1 epoch, resnet8, a few benchmark steps) on the data given:
                 checks this script itself on a CPU, in seconds on a tiny archive (minutes on
                 the whole of CIFAR-10-LT); the compiled steps (bench_graphs, bench_options,
                 train_compile, bench_joint) only where --only names them (each cold compilation
                 takes about 30 s on 2 CPU cores; on the CPU reduce-overhead records no CUDA graphs)
  -h, --help     this message

Python: \${PYTHON:-python3}. GIT_COMMIT, if set, is the commit written to log.txt and to the runs'
results.json and the benchmark JSON as their git_commit (else the checkout's, if it is one).
GPU_CHECKS_GRACE_S (default 10): a step's SIGTERM comes that long before its cap, its SIGKILL at
the cap, and a step with less than three times that left is skipped. Run folders and the unpacked
data go to a scratch folder removed at the end.
EOF
}

die_usage() {
  echo "$prog: error: $1 (see --help)" >&2
  exit 2
}

data="" out="" device="cuda" budget_s=560 workers=6 smoke=0 only="" only_given=0
all_steps="train_eager benchmark bench_supcon bench_graphs bench_options train_compile bench_joint table1"
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --smoke) smoke=1; shift ;;
    --data=* | --out=* | --device=* | --budget_s=* | --workers=* | --only=*)
      name=${1%%=*}; set -- "$name" "${1#*=}" "${@:2}"; continue ;;
    --data | --out | --device | --budget_s | --workers | --only)
      (($# >= 2)) || die_usage "$1 needs a value"
      case $1 in
        --data) data=$2 ;;
        --out) out=$2 ;;
        --device) device=$2 ;;
        --budget_s) budget_s=$2 ;;
        --workers) workers=$2 ;;
        --only) only=$2 only_given=1 ;;
      esac
      shift 2 ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
done
[[ -n $data ]] || die_usage "--data is required"
[[ -n $out ]] || die_usage "--out is required"
# A relative path that starts with '-' would read as an option to dirname, basename, ls, mkdir and cd below.
[[ $data != -* ]] || data=./$data
[[ $out != -* ]] || out=./$out
[[ -e $data ]] || die_usage "--data '$data' does not exist"
[[ $device == cuda || $device == cpu ]] || die_usage "--device must be cuda or cpu, got '$device'"
[[ $budget_s =~ ^(0|[1-9][0-9]{0,8})$ ]] || die_usage "--budget_s must be a whole number of seconds below 10**9, got '$budget_s'"
[[ $workers =~ ^(0|[1-9][0-9]{0,2})$ ]] && ((workers <= 128)) ||  # benchmark.py's MAX_WORKERS
  die_usage "--workers must be a whole number from 0 to 128, got '$workers'"
if ((only_given)); then
  # Commas only: an entry with a space or a line break in it would match no step and run nothing.
  [[ $only != *[[:space:]]* ]] || die_usage "--only: the steps are separated by commas, without spaces"
  IFS=, read -ra only_steps <<<"$only,"  # the trailing comma keeps an empty last entry ("a,") in the list
  for step in "${only_steps[@]}"; do
    known=0
    for name in $all_steps; do [[ $step == "$name" ]] && known=1; done
    ((known)) || die_usage "--only: no step '$step' (the steps: ${all_steps// /, })"
  done
  # One file each, besides log.txt and summary.md; a lent machine returns at most 8 (so at most six steps).
  n_chosen=0
  for name in $all_steps; do [[ ",$only," != *",$name,"* ]] || n_chosen=$((n_chosen + 1)); done
  ((n_chosen + 2 <= 8)) ||
    die_usage "--only: $n_chosen steps would leave $((n_chosen + 2)) files in --out, more than a lent machine returns (8); name at most 6 (leave $((n_chosen - 6)) out)"
fi
[[ ! -e $out || -d $out ]] || die_usage "--out '$out' exists and is not a folder: give a new folder"
if [[ -e $out && -n $(ls -A "$out" 2>/dev/null) ]]; then
  die_usage "--out '$out' is not empty: give a new folder (nothing there was touched)"
fi

python=${PYTHON:-python3}
grace=${GPU_CHECKS_GRACE_S:-10}
[[ $grace =~ ^[1-9][0-9]{0,3}$ ]] || die_usage "GPU_CHECKS_GRACE_S must be a whole number of seconds from 1 to 9999, got '$grace'"
data="$(cd "$(dirname "$data")" && pwd)/$(basename "$data")"  # before the cd below
if ! scratch=$(mktemp -d -- "${TMPDIR:-/tmp}/gpu_checks.XXXXXX" 2>/dev/null); then
  echo "$prog: error: cannot make a scratch folder in TMPDIR '${TMPDIR:-/tmp}' (missing or not writable?)" >&2
  exit 2
fi
scratch=$(cd "$scratch" && pwd)  # absolute: the steps run from the repository (cd below), and so does the EXIT trap
trap 'rm -rf "$scratch"' EXIT

if [[ -d $data ]]; then
  data_root=$data
  [[ -d $data/train || -d $data/cifar-10-batches-py ]] ||
    { echo "$prog: error: '$data' holds no CIFAR-10 layout (train/<class>/ + test/<class>/, or cifar-10-batches-py/)" >&2; exit 2; }
else
  # tar and gzip say why in several lines (and a "Child returned status" one): keep the first, on our one line.
  if ! tar_error=$(tar -xzf "$data" -C "$scratch" 2>&1); then
    echo "$prog: error: cannot unpack '$data' ($(grep -m 1 . <<<"$tar_error" || true))" >&2
    exit 2
  fi
  # The folder that holds train/ (the image-folder layout) or cifar-10-batches-py/.
  marker=$(find "$scratch" -maxdepth 3 -type d \( -name train -o -name cifar-10-batches-py \) -print -quit)
  [[ -n $marker ]] || { echo "$prog: error: '$data' holds no CIFAR-10 layout" >&2; exit 2; }
  data_root=$(dirname "$marker")
fi
# --out only once the data is there: bad data leaves no folder behind
mkdir_error=$(mkdir -p "$out" 2>&1) || die_usage "--out '$out' cannot be created (${mkdir_error##*: })"
out=$(cd "$out" && pwd)
log="$out/log.txt"
cd "$repo_root"

statuses=()
any_failed=0
# Ctrl-C or SIGTERM: the running step gets one SIGTERM (through timeout, which passes it on; main.py then saves its
# last.pt and stops), the steps after it are not run, and the summary is still written; exit 130 or 143. (timeout
# runs each step in a process group of its own, so a Ctrl-C at the terminal reaches this script alone.)
interrupted="" step_pid="" trapped=0
on_signal() {
  trapped=1
  [[ -n $interrupted ]] && return # one SIGTERM per step, as sweep.sh sends its runs
  interrupted=$1
  echo "$prog: interrupted ($1): stopping the running step; the summary follows" >&2
  [[ -z $step_pid ]] || kill -TERM "$step_pid" 2>/dev/null || true
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
last_cut=0  # 1 when the last step run_step ran was cut off by its cap
reserve=15  # seconds kept for the summary at the end

# note TEXT: to the terminal and to log.txt.
note() {
  echo "$*" | tee -a "$log"
}

# run_step NAME CAP -- CMD...: CMD under min(CAP, budget left) seconds, its output appended to log.txt.
run_step() {
  local name=$1 cap=$2
  shift 3
  local left=$((budget_s - reserve - (SECONDS - start)))
  local limit=$((cap < left ? cap : left))
  last_cut=0
  if [[ -n $interrupted ]]; then
    statuses+=("$name: not run (interrupted)")
    any_failed=1
    note "== $name: not run (interrupted by SIG$interrupted)"
    return
  fi
  if ((limit < 3 * grace)); then
    statuses+=("$name: skipped (${left}s of the budget left)")
    any_failed=1
    note "== $name: skipped, ${left}s of the budget left"
    return
  fi
  local shown
  printf -v shown '%q ' "$@" # as it can be run again by copy and paste
  note "== $name (at most ${limit}s): ${shown% }"
  local t0=$SECONDS rc=0
  # TERM at limit - grace (main.py then saves last.pt and stops), KILL at the limit. The Inductor cache is the
  # step's own unless the caller names a shared one (inductor_cache=NAME run_step ...).
  # In the background, so that a signal's trap runs at once rather than once the step has ended.
  PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="$scratch/inductor_${inductor_cache:-$name}" \
    timeout --signal=TERM --kill-after="$grace" $((limit - grace)) "$@" >>"$log" 2>&1 </dev/null &
  step_pid=$!
  [[ -z $interrupted ]] || kill -TERM "$step_pid" 2>/dev/null || true # a signal just before the line above
  while :; do # wait also returns when a trapped signal arrives: then wait again, for the step's own status
    trapped=0 rc=0
    wait "$step_pid" || rc=$?
    ((trapped)) || break
  done
  step_pid=""
  local took=$((SECONDS - t0))
  # 124: the TERM ended it; 137: the KILL did, or something else's SIGKILL (the kernel's out-of-memory killer)
  # did, which before the TERM's time is a failure, not the cap.
  if ((rc == 124 || (rc == 137 && took >= limit - grace))); then
    last_cut=1
  fi
  if ((rc == 0)); then
    statuses+=("$name: ok (${took}s)")
  elif [[ -n $interrupted ]]; then
    statuses+=("$name: INTERRUPTED after ${took}s (exit $rc)")
    any_failed=1
  elif ((last_cut)); then
    statuses+=("$name: CUT OFF after ${took}s (limit ${limit}s)")
    any_failed=1
  else
    statuses+=("$name: FAILED, exit $rc after ${took}s")
    any_failed=1
  fi
  note "   ${statuses[-1]}"
}

{
  echo "== environment"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  if [[ -n ${GIT_COMMIT:-} ]]; then
    commit=$GIT_COMMIT
  elif commit=$(git rev-parse HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || commit+=" (with uncommitted changes)"
  else
    commit="unknown (no .git here; set GIT_COMMIT)"
  fi
  echo "commit: $commit"
  echo "data: $data_root"
  "$python" -c 'import sys, torch, torchvision; print("python", sys.version.split()[0]); print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); torch.cuda.is_available() and print("gpu", torch.cuda.get_device_name(0))' 2>&1 || true
  # What main.py and the benchmark import besides torch: a missing one shows here, before the first step fails on it.
  "$python" -c 'import numpy, PIL, tqdm, tensorboard; print("numpy", numpy.__version__, "pillow", PIL.__version__, "tqdm", tqdm.__version__, "tensorboard", tensorboard.__version__)' 2>&1 || true
  echo "cpu cores: $(nproc 2>/dev/null || echo '?')"
  # The benchmark's reference passes batches from its DataLoader workers through /dev/shm.
  shm=$(df -hP /dev/shm 2>/dev/null | awk 'NR == 2 { print $2 " total, " $4 " free" }')
  echo "/dev/shm: ${shm:-absent}"
  if command -v nvidia-smi >/dev/null; then nvidia-smi 2>&1 || echo "nvidia-smi failed"; else echo "nvidia-smi: not found"; fi
} >>"$log"

if ((smoke)); then
  run_args=(--model resnet8 --batch_size 16 --epochs 1 --lr_decay_epochs "" --imb_factor 0.1)
  bench_args=(--model resnet8 --batch_size 16 --steps 2 --warmup_steps 1 --imb_factor 0.1)
  memory_args=(--memory_batch_sizes "")
else
  run_args=()
  bench_args=(--batch_size 512 --steps 50 --warmup_steps 10)
  memory_args=()
fi
bench=("$python" scripts/benchmark.py --device "$device" --data_root "$data_root" "${bench_args[@]}")

# train STEP VARIANT CAP [main.py flags]: one 200-epoch run in the folder of VARIANT; its results.json comes
# back as results_VARIANT.json.
train() {
  local step=$1 variant=$2 cap=$3
  shift 3
  local run_dir="$scratch/runs/sc_$variant"
  run_step "$step" "$cap" -- "$python" main.py --data_root "$data_root" --device "$device" --loss sc \
    --output_dir "$run_dir" --print_freq 24 --ncm_every 10 ${run_args[@]+"${run_args[@]}"} "$@"
  if [[ -f $run_dir/results.json ]]; then
    cp "$run_dir/results.json" "$out/results_$variant.json"
  fi
}

# JPEG files are decoded once into the .npz cache beside them (in the scratch folder), outside the steps below.
run_step decode 90 -- "$python" -c 'import sys, dataset_loader; dataset_loader.load_cifar("cifar10", sys.argv[1])' \
  "$data_root"
# leave_out STEP WHY: a step not run, said so (not a failure). chosen STEP: whether --only (if given) names STEP;
# one it leaves out is said so. compiled STEP: chosen, and under --smoke only where --only names it (its compilation
# takes longer than the rest of a smoke run).
leave_out() {
  statuses+=("$1: $2")
  note "== $1: $2"
}
chosen() {
  if ((!only_given)) || [[ ",$only," == *",$1,"* ]]; then
    return 0
  fi
  leave_out "$1" "not chosen (--only)"
  return 1
}
compiled() {
  chosen "$1" || return 1
  if ((smoke && !only_given)); then
    leave_out "$1" "not in --smoke unless --only names it"
    return 1
  fi
}

eager_dir="$scratch/runs/sc_eager" eager_cut=0
if chosen train_eager; then
  train train_eager eager 240
  # Cut off by its cap, main.py saved last.pt on the TERM: resumed after the benchmarks. (A TERM during the last
  # epoch's evaluation or results can still let the run finish: results.json says so.)
  if ((last_cut)) && [[ -f $eager_dir/last.pt && ! -f $eager_dir/results.json ]]; then
    eager_cut=1
  fi
fi
if chosen benchmark; then
  run_step benchmark 90 -- "${bench[@]}" --workers "$workers" --profile --json "$out/bench.json" ${memory_args[@]+"${memory_args[@]}"}
fi
if chosen bench_supcon; then
  run_step bench_supcon 60 -- "${bench[@]}" --sc_aug supcon --no_reference --memory_batch_sizes "" \
    --json "$out/bench_supcon.json"
fi
if ((eager_cut)); then
  train train_eager_resumed eager "$budget_s" --resume
fi
if compiled bench_graphs; then
  inductor_cache=compile run_step bench_graphs 180 -- "${bench[@]}" --workers "$workers" --compile \
    --compile_mode reduce-overhead --repeats 3 --profile --memory_batch_sizes "" --json "$out/bench_graphs.json"
fi
if compiled bench_options; then
  run_step bench_options 210 -- "${bench[@]}" --compare_options --no_reference --memory_batch_sizes "" \
    --json "$out/bench_options.json"
fi
if compiled train_compile; then
  if ((eager_cut)); then
    leave_out train_compile "not run (the cut-off eager run was resumed instead)"
  else
    inductor_cache=compile train train_compile compile "$budget_s" --compile --compile_mode reduce-overhead
  fi
fi

if ((!only_given)); then
  leave_out bench_joint "not run (only when --only names it)"
elif compiled bench_joint; then
  run_step bench_joint 150 -- "${bench[@]}" --compile --compile_mode reduce-overhead --bn_stats joint --no_reference \
    --profile --memory_batch_sizes "" --json "$out/bench_joint.json"
fi

table1_dir="$scratch/table1"
if ((!only_given)); then
  leave_out table1 "not run (only when --only names it)"
elif chosen table1; then
  if ((smoke)); then
    table1_args=(--model resnet8 --batch_size 16 --epochs 1 --lr_decay_epochs "")
  else
    table1_args=(--compile --compile_mode reduce-overhead)
  fi
  # The sweep's own scratch (its TMPDIR) holds a pid file per running run (sweep.sh's launch_and_wait).
  sweep_tmp="$scratch/table1_sweep"
  mkdir -p "$sweep_tmp"
  inductor_cache=compile run_step table1 "$budget_s" -- env PYTHON="$python" TMPDIR="$sweep_tmp" bash scripts/sweep.sh \
    --dataset cifar10 --imb_factors "0.02 0.1" --methods "sc psc" --runs_dir "$table1_dir" -- --data_root "$data_root" \
    --device "$device" --print_freq 24 --eval_every 5 "${table1_args[@]}"
  # At its cap the sweep passed its TERM on to the running main.py, which stops after the current step; the KILL
  # $grace s later reaches the sweep alone (each run has a process group of its own). A run still in a step that long
  # (the first one, compiling) is killed here, before the packing below and the removal of the scratch folder; its
  # folder keeps the last.pt of its last epoch, if any (written atomically).
  for pid_file in "$sweep_tmp"/sweep.*/pid.*; do
    [[ -f $pid_file ]] || continue
    pid=$(<"$pid_file") || continue
    if [[ $pid =~ ^[0-9]+$ ]] && kill -KILL "$pid" 2>/dev/null; then
      note "   table1: killed a run that was still in a step ${grace} s after its SIGTERM (pid $pid)"
      for _ in {1..50}; do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  # Each run's config.json and results.json, or the last.pt of one that was cut off (about 4 MB), in one file.
  table1_files=()
  for run_dir in "$table1_dir"/*/; do
    [[ -f $run_dir/config.json ]] || continue
    run=$(basename "$run_dir")
    table1_files+=("$run/config.json")
    if [[ -f $run_dir/results.json ]]; then
      table1_files+=("$run/results.json")
    elif [[ -f $run_dir/last.pt ]]; then
      table1_files+=("$run/last.pt")
    fi
  done
  if ((${#table1_files[@]})); then
    tar -czf "$out/table1_runs.tar.gz" -C "$table1_dir" "${table1_files[@]}" 2>>"$log" ||
      note "   table1: packing the runs failed (exit $?; see log.txt)"
  fi
fi

# A step killed while writing its JSON can leave the temporary file of that write (util.atomic_write) behind.
rm -f "$out"/.*.tmp
summarised=0
# summarise TITLE PATH: a section of summary.md, scripts/summarize.py --per_class --per_run on PATH (a results.json,
# or a runs folder, whose runs without a results.json, cut off or failed, its stderr names); --per_run adds each
# run's best epoch, samples/s and training time, which the rows leave out.
summarise() {
  {
    echo "## $1"
    echo
    "$python" scripts/summarize.py "$2" --per_class --per_run 2>&1 || echo "(summarize failed on $2)"
    echo
  } >>"$out/summary.md"
  summarised=1
}
for results in "$out"/results_*.json; do
  [[ -f $results ]] || continue
  variant=${results##*/results_}
  summarise "${variant%.json}" "$results"
done
for results in "$table1_dir"/*/results.json; do
  if [[ -f $results ]]; then
    summarise table1 "$table1_dir"
    break
  fi
done
((summarised)) || echo "no run finished: see log.txt" >"$out/summary.md"

note "== done in $((SECONDS - start))s; files in $out:"
printf '   %s\n' "${statuses[@]}" | tee -a "$log"
ls "$out" | sed 's/^/   /'
[[ $interrupted != INT ]] || exit 130
[[ $interrupted != TERM ]] || exit 143
exit "$any_failed"
}
