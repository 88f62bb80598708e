#!/usr/bin/env bash
# Sweep main.py over imbalance factors x methods x seeds, one run folder each.
#
# A run's folder tells its state (main.py writes results.json only when a run has finished):
#   results.json, last.pt   -> finished: main.py --resume checks that its recipe is this sweep's
#                              (and does nothing else), then it counts as skipped; a results.json that
#                              cannot be read main.py writes again from last.pt: done
#   results.json only       -> finished, last.pt deleted: cannot be checked, skipped
#   last.pt, no results     -> unfinished: run again with --resume
#   best.pt only            -> a model saved without last.pt (last.pt deleted, or earlier code, which wrote
#                              best.pt first, stopped between the two writes): FAILED, left as it is
#   folder with none        -> crashed before its first checkpoint: run again with --overwrite
#   no folder               -> fresh run
# So the same command can be repeated after a crash or a Ctrl-C and only does what is left. A run whose folder
# another process holds (main.py locks it while it runs; exit 75) is BUSY: two sweeps over one --runs_dir share it.
# Runs go one after another, or with --gpus as a queue: one run per listed GPU at a time.
{ # The whole script is one compound command, which bash reads in full before running any of it: a change
  # to this file while it runs (an edit, a checkout) cannot reach the running copy, which reads no more.
set -euo pipefail

prog=$(basename "$0")
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
  cat <<EOF
Usage: $prog --dataset cifar10|cifar100 --imb_factors "0.01 0.005" [--methods "sc psc ce"]
       [--seeds "0 1 2"] [--imb_type exp|step] [--runs_dir DIR] [--gpus "0 1"] [-- extra main.py args]

Runs main.py once per (seed, imb_factor, method), in DIR/<dataset>_<method>_r<ratio>_s<seed>
with ratio = 1/imb_factor rounded, halves up (0.01 -> r100, 0.4 -> r3); <dataset>_<method>_step_r<ratio>_s<seed>
with --imb_type step.

  --dataset D        cifar10 or cifar100 (required)
  --imb_type T       exp (default, the paper's) or step
  --imb_factors F..  n_min/n_max values, each in (0, 1] (required); lists are separated by
                     spaces or newlines (--seeds "\$(seq 0 2)")
  --methods M..      any of sc psc ce (default: "sc psc")
  --seeds S..        integer seeds (default: "0")
  --runs_dir DIR     parent folder of the run folders (default: runs/sweep)
  --gpus G..         GPU ids for CUDA_VISIBLE_DEVICES; one run per listed id at a time, each
                     run's output appended to DIR/logs/<run>.log. List an id twice to give it
                     two runs at once. An entry is a device index, a GPU-/MIG- UUID or a comma
                     list of them (with PYTHON="torchrun --nproc_per_node 2"). Refused where
                     main.py finds no CUDA device under one of the entries (each gets a dry
                     run), and with --device cpu after --. Default:
                     runs one after another, output to the terminal.
  -- ARGS            passed to every run of main.py (e.g. -- --epochs 20 --lr_decay_epochs 12,16);
                     the flags the sweep sets itself (--dataset --imb_type --imb_factor --loss
                     --seed --output_dir --resume --overwrite), those that make main.py train nothing
                     (--dry_run --eval_only --checkpoint --help -h), and any start of them (--see, --output:
                     main.py takes an unambiguous start of a flag for the flag), are refused here.
  -h, --help         this message

Before the first run, main.py --dry_run as each run with training left whose imb_factor or method
no earlier one had (in a scratch folder) checks the flags, the device, the data and the split: if
one fails, its line is the sweep's error (exit 2) and no run starts; their notes (main.py's "note:"
lines, each once) are printed before the runs start. None when every run has finished.
A finished run is skipped once main.py --resume has checked (in a few seconds, reading no data)
that it was made with the recipe given now (one whose results.json cannot be read, cut off by a
full disk say, main.py evaluates and writes again from its last.pt: "done (results.json written
again)"): the data, model, loss and optimisation settings that
a resume compares, not how it ran (--amp, --eval_every, ...). One made with another recipe (say
--alpha_schedule or --epochs) is a FAILED run with main.py's line saying which, never taken for
this sweep's: use another --runs_dir. A run whose last.pt was deleted cannot be checked and is
skipped. Delete a folder to run it again.
Python: \${PYTHON:-python} (currently: ${PYTHON:-python}).
At the end prints each run's folder and status (done / skipped / BUSY / FAILED); exits 1 if any run
failed, 75 if the only runs not done were BUSY, 130 if interrupted: Ctrl-C or SIGTERM sends each
running run one SIGTERM (main.py then saves last.pt and stops) and starts no new run; rerun the
same command to resume. BUSY: another process (this sweep started a second time over the same
--runs_dir, say) was training that run; main.py locks a run's folder while it runs (under
PYTHON="torchrun ..." such a run is FAILED: torchrun's exit status hides main.py's).
EOF
}

# main.py's flags that the sweep sets for each run, and those that make main.py train nothing: refused after --.
sweep_flags=(--dataset --imb_type --imb_factor --loss --seed --output_dir --resume --overwrite)
not_training=(--dry_run --eval_only --checkpoint --help)

# main_flag ARG: whether ARG is one of main.py's flags (a field of its Config) that the sweep passes on after --.
main_flag() {
  local flag=${1%%=*}
  [[ $flag =~ ^--[a-z_]+$ && " ${sweep_flags[*]} ${not_training[*]} " != *" $flag "* ]] &&
    grep -qE "^    ${flag#--}: [^=]+= _opt\(" "$repo_root/main.py" 2>/dev/null
}

die_usage() {
  echo "$prog: error: $1 (see --help)" >&2
  exit 2
}

# comma_hint LIST [decimal]: for an option's list written with commas (as main.py's --lr_decay_epochs takes one), the
# same list as the sweep takes it; with "decimal", a number written with a decimal comma (0,01) as 0.01.
comma_hint() {
  local words word parts out=() decimal=0
  [[ $1 == *,* ]] || return 0
  read -r -a words <<<"${1//$'\n'/ }"
  for word in "${words[@]}"; do
    if [[ ${2:-} == decimal && $word =~ ^[0-9]*,[0-9]+$ ]]; then
      out+=("${word/,/.}") decimal=1
    else
      read -r -a parts <<<"${word//,/ }"
      out+=(${parts[@]+"${parts[@]}"})
    fi
  done
  if ((decimal)); then
    printf ' (a decimal point, not a comma: "%s"?)' "${out[*]}"
  else
    printf ' (the list is space-separated: "%s")' "${out[*]}"
  fi
}

# ---- arguments -------------------------------------------------------------------------------
dataset="" imb_type="exp" imb_factors="" methods="sc psc" seeds="0" runs_dir="runs/sweep" gpus=""
extra_args=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --) shift; extra_args=("$@"); break ;;
    --dataset=* | --imb_type=* | --imb_factors=* | --methods=* | --seeds=* | --runs_dir=* | --gpus=*)
      name=${1%%=*}; set -- "$name" "${1#*=}" "${@:2}"; continue ;;
    --dataset | --imb_type | --imb_factors | --methods | --seeds | --runs_dir | --gpus)
      (($# >= 2)) || die_usage "$1 needs a value"
      case $1 in
        --dataset) dataset=$2 ;;
        --imb_type) imb_type=$2 ;;
        --imb_factors) imb_factors=$2 ;;
        --methods) methods=$2 ;;
        --seeds) seeds=$2 ;;
        --runs_dir) runs_dir=$2 ;;
        --gpus) gpus=$2 ;;
      esac
      shift 2 ;;
    *) main_flag "$1" && die_usage "unknown argument '$1' (a main.py flag: pass it after --)"
       case ${1%%=*} in  # main.py's flag of which the sweep takes a list
         --imb_factor | --loss | --seed) die_usage "unknown argument '$1' (the sweep sets it for each run: give $(
           case ${1%%=*} in --imb_factor) echo --imb_factors ;; --loss) echo --methods ;; *) echo --seeds ;; esac))" ;;
       esac
       die_usage "unknown argument '$1'" ;;
  esac
done

case $dataset in
  cifar10 | cifar100) ;;
  "") die_usage "--dataset is required" ;;
  *) die_usage "--dataset must be cifar10 or cifar100, got '$dataset'" ;;
esac
case $imb_type in
  exp) folder_kind="" ;;
  step) folder_kind="step_" ;; # as main.py names its default folder
  *) die_usage "--imb_type must be exp or step, got '$imb_type'" ;;
esac
# read reads one line: newlines separate values as spaces do (--seeds "$(seq 0 2)"), else the values after the
# first line would be silently lost.
read -r -a factor_list <<<"${imb_factors//$'\n'/ }"
read -r -a method_list <<<"${methods//$'\n'/ }"
read -r -a seed_list <<<"${seeds//$'\n'/ }"
read -r -a gpu_list <<<"${gpus//$'\n'/ }"
((${#factor_list[@]})) || die_usage "--imb_factors is required"
((${#method_list[@]})) || die_usage "--methods is empty"
((${#seed_list[@]})) || die_usage "--seeds is empty"
[[ -n $runs_dir ]] || die_usage "--runs_dir is empty"
# A relative path that starts with '-' would read as an option, to mkdir and to main.py's --output_dir.
[[ $runs_dir != -* ]] || runs_dir=./$runs_dir
# Else every run would fail on its own, each with main.py's line about its --output_dir.
[[ ! -e $runs_dir || -d $runs_dir ]] || die_usage "--runs_dir '$runs_dir' exists and is not a folder"
ancestor=$runs_dir # the nearest part of the path that exists must be a folder too (afile/runs)
while [[ ! -e $ancestor && $ancestor == */* ]]; do ancestor=${ancestor%/*}; done
[[ -z $ancestor || ! -e $ancestor || -d $ancestor ]] ||
  die_usage "--runs_dir '$runs_dir': '$ancestor' exists and is not a folder"
# --gpus appends each run's output to a file in it: else every run would fail at its log.
[[ -z ${gpus//[[:space:]]/} || ! -e $runs_dir/logs && ! -L $runs_dir/logs || -d $runs_dir/logs ]] ||
  die_usage "--gpus writes each run's output into '$runs_dir/logs/', which exists and is not a folder: move it away"

# ratio = 1/imb_factor rounded halves up (as main.py names its default folder), only for the folder name;
# main.py gets imb_factor as written.
declare -A ratio_of=()
for factor in "${factor_list[@]}"; do
  [[ $factor =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] ||
    die_usage "--imb_factors: '$factor' is not a number$(comma_hint "$imb_factors" decimal)"
  ratio=$(awk -v f="$factor" 'BEGIN { if (f <= 0 || f > 1) exit 1; printf "%d", int(1 / f + 0.5) }') ||
    die_usage "--imb_factors: '$factor' is not in (0, 1] (it is n_min/n_max, e.g. 0.01 for ratio 100)"
  ratio_of[$factor]=$ratio
done
for method in "${method_list[@]}"; do
  case $method in sc | psc | ce) ;; *) die_usage "--methods: '$method' is not one of sc psc ce$(comma_hint "$methods")" ;; esac
done
for seed in "${seed_list[@]}"; do
  # No leading zeros: "0" and "00" are one seed to main.py but two folders (two identical runs, which
  # summarize.py then refuses as a repeated seed). main.py takes seeds below 2**32 (numpy's limit).
  [[ $seed =~ ^(0|[1-9][0-9]{0,9})$ ]] && ((seed < 4294967296)) ||
    die_usage "--seeds: '$seed' is not an integer in 0 .. 4294967295 (without leading zeros)$(comma_hint "$seeds")"
done
# Each --gpus entry becomes a run's CUDA_VISIBLE_DEVICES: device indices, GPU-/MIG- UUIDs, or a comma list of them
# (a torchrun job on several GPUs). CUDA ignores an entry it cannot read (a typo like O for 0) and shows no
# device, and main.py's --device auto would then train on the CPU without a word.
device_id='([0-9]+|GPU-[0-9a-fA-F-]+|MIG-[0-9A-Za-z/-]+)'
for gpu in ${gpu_list[@]+"${gpu_list[@]}"}; do
  [[ $gpu =~ ^$device_id(,$device_id)*$ ]] ||
    die_usage "--gpus: '$gpu' is not a device index, a GPU-/MIG- UUID or a comma list of them"
done
# argparse keeps the last occurrence of a flag, so an extra --seed etc. would silently
# disagree with the folder name: refuse it. argparse also takes any unambiguous start of a flag for
# the flag (--see for --seed, --output for --output_dir: every run in one folder, where another
# run's --overwrite would then clear it), so refuse those starts too.
# Flags that make main.py train nothing would leave every run without results.json, a failure: refuse them too
# (sweep_flags and not_training, above).
# The --device main.py will take from them (its last, under any unambiguous start of the flag: --dev, --devi=).
device_given="" device_next=0
for arg in ${extra_args[@]+"${extra_args[@]}"}; do
  if ((device_next)); then
    device_next=0
    if [[ $arg != -* ]]; then # (else --device lacks its value, main.py's to refuse, and this is a flag to check)
      device_given=$arg
      continue
    fi
  fi
  flag=${arg%%=*}
  if ((${#flag} >= 5)) && [[ --device == "$flag"* ]]; then # (--de could be --deterministic too: main.py refuses it)
    if [[ $arg == *=* ]]; then device_given=${arg#*=}; else device_next=1; fi
  fi
  [[ $flag != -h ]] || die_usage "'-h' makes main.py train nothing, and a sweep trains its runs; remove it after --"
  [[ $flag == --?* ]] || continue # not a long flag ("--" alone ends main.py's options)
  for sweep_flag in "${sweep_flags[@]}" "${not_training[@]}"; do
    if [[ " ${not_training[*]} " == *" $sweep_flag "* ]]; then
      is="makes main.py train nothing, and a sweep trains its runs" which=$is
    else
      is="is set by the sweep for each run" which="the sweep sets for each run"
    fi
    if [[ $flag == "$sweep_flag" ]]; then
      die_usage "'$flag' $is; remove it after --"
    elif [[ $sweep_flag == "$flag"* ]]; then
      die_usage "'$flag' is the start of '$sweep_flag', which $which (main.py takes an unambiguous start for the flag); spell main.py's flags in full after --"
    fi
  done
done
# --gpus queues runs on GPUs: a --device cpu after -- would run them all on the CPU at once.
if ((${#gpu_list[@]})) && [[ $device_given == cpu ]]; then
  die_usage "--gpus runs each run on a GPU, and --device cpu after -- runs them on the CPU: drop one of the two"
fi

read -r -a python_cmd <<<"${PYTHON:-python}"
((${#python_cmd[@]})) || die_usage "PYTHON is set but empty"
# Else every run would fail on its own with the shell's "not found".
command -v -- "${python_cmd[0]}" >/dev/null || die_usage "PYTHON: '${python_cmd[0]}' is not a command"

# ---- the list of runs ------------------------------------------------------------------------
# Seeds outermost: a whole table for the first seed is ready before the second seed starts.
run_names=() run_factors=() run_methods=() run_seeds=()
declare -A seen_name=()
for seed in "${seed_list[@]}"; do
  for factor in "${factor_list[@]}"; do
    for method in "${method_list[@]}"; do
      name="${dataset}_${method}_${folder_kind}r${ratio_of[$factor]}_s${seed}"
      [[ -z ${seen_name[$name]+x} ]] ||
        die_usage "two runs would share the folder '$name' (repeated seed, method or imb_factor rounding to the same ratio)"
      seen_name[$name]=1
      run_names+=("$name") run_factors+=("$factor") run_methods+=("$method") run_seeds+=("$seed")
    done
  done
done
n_runs=${#run_names[@]}
runs_word=runs
((n_runs != 1)) || runs_word=run

# Per-sweep scratch: the queue counter, each run's status and the pid of each running run.
if ! state_dir=$(mktemp -d -- "${TMPDIR:-/tmp}/sweep.XXXXXX" 2>/dev/null); then
  echo "$prog: error: cannot make a scratch folder in TMPDIR '${TMPDIR:-/tmp}' (missing or not writable?)" >&2
  exit 2
fi
trap 'rm -rf "$state_dir"' EXIT
echo 0 >"$state_dir/next"

# Prints the index of the next run in the queue; fails when the queue is empty.
# A mkdir lock makes the claim atomic across GPU workers (portable, unlike flock).
claim_next_run() {
  local next
  until mkdir "$state_dir/lock" 2>/dev/null; do sleep 0.05; done
  next=$(<"$state_dir/next")
  if ((next < n_runs)); then echo $((next + 1)) >"$state_dir/next"; fi
  rmdir "$state_dir/lock"
  ((next < n_runs)) && echo "$next"
}

# main.py and the flags the sweep sets for run $1, with --output_dir $2, into the array cmd (the caller's own, if
# it declares one local).
run_command() {
  cmd=("${python_cmd[@]}" "$repo_root/main.py" --dataset "$dataset" --imb_type "$imb_type"
    --imb_factor "${run_factors[$1]}" --loss "${run_methods[$1]}" --seed "${run_seeds[$1]}" --output_dir "$2")
}

# The inode number of file $1 (empty if it is missing): main.py writes results.json atomically (a new file renamed
# over the old, so a new inode). `ls -di` is POSIX, where stat's flags differ between GNU and BSD (macOS).
inode_of() {
  local line inode
  line=$(ls -di -- "$1" 2>/dev/null) || return 0
  read -r inode _ <<<"$line"
  echo "$inode"
}

# Runs (or skips) run $1 on GPU $2 ("" = no CUDA_VISIBLE_DEVICES, output to the terminal);
# writes its status to $state_dir/status.$1.
run_one() {
  local idx=$1 gpu=$2
  local name=${run_names[idx]}
  local run_dir="$runs_dir/$name" status_file="$state_dir/status.$idx"
  local state_flag=() finished=""
  # -f: a results.json that is not a file (a folder) is no finished run's; main.py then says what is wrong
  # (--resume beside a last.pt: it cannot be read; --overwrite: the folder cannot be prepared). Nothing is lost.
  if [[ -f $run_dir/results.json && ! -e $run_dir/last.pt ]]; then
    echo "[$name] finished already (no last.pt to check its settings against): skipped"
    echo "skipped" >"$status_file"
    return 0
  elif [[ -f $run_dir/results.json ]]; then
    echo "[$name] finished already: checking its settings against these"
    finished=1 state_flag=(--resume) # main.py refuses another recipe, else says it has nothing to do
  elif [[ -e $run_dir/last.pt ]]; then
    state_flag=(--resume)
  elif [[ -e $run_dir/best.pt ]]; then
    # Saved a model but no last.pt (last.pt deleted; or earlier code, which wrote best.pt first, stopped between the
    # two writes): main.py refuses to start over it, and so does the sweep, whose --overwrite would delete that best.pt.
    echo "[$name] FAILED (it holds best.pt but no last.pt to resume from; move the folder away, or delete it, to run it again)"
    echo "FAILED (best.pt without last.pt)" >"$status_file"
    return 0
  elif [[ -e $run_dir ]]; then
    state_flag=(--overwrite) # a run that saved nothing (killed or diverged before its first checkpoint)
  fi
  local cmd results_before=""
  [[ -z $finished ]] || results_before=$(inode_of "$run_dir/results.json")
  run_command "$idx" "$run_dir"
  cmd+=(${state_flag[@]+"${state_flag[@]}"} ${extra_args[@]+"${extra_args[@]}"})

  local rc=0 prefix="" log=""
  [[ -z $gpu ]] || prefix="CUDA_VISIBLE_DEVICES=$(printf '%q' "$gpu") "
  echo "[$name] $prefix$(printf '%q ' "${cmd[@]}")"
  if [[ -z $gpu ]]; then
    launch_and_wait "$idx" "$gpu" "${cmd[@]}" || rc=$?
  else
    log="$runs_dir/logs/$name.log"
    # (a named pipe there: its open would wait for a reader)
    if ! mkdir -p "$runs_dir/logs" 2>/dev/null || [[ -p $log ]] || ! { : >>"$log"; } 2>/dev/null; then
      # (a read-only --runs_dir, a folder or a pipe where the log goes): this run fails, the queue goes on
      echo "[$name] FAILED (cannot write its log $log): not started"
      echo "FAILED (cannot write its log $log)" >"$status_file"
      return 0
    fi
    echo "[$name] output: $log"
    launch_and_wait "$idx" "$gpu" "${cmd[@]}" >>"$log" 2>&1 || rc=$?
  fi

  local status interrupted=0 # the stop file read once, so that every branch below sees the same answer
  [[ ! -e $state_dir/stop ]] || interrupted=1
  local rewritten=0 # main.py wrote results.json again (atomically: a new inode), having found it damaged
  [[ -z $finished || $(inode_of "$run_dir/results.json") == "$results_before" ]] || rewritten=1
  if ((rewritten && (rc == 0 || interrupted))); then
    status="done (results.json written again: main.py could not read it)"
  elif [[ -n $finished ]] && ((rc == 0 || interrupted)); then
    # checked, or stopped by the interrupt while being checked (torchrun then exits 1, whatever its worker did):
    # it had finished either way, and the next sweep checks it again
    status="skipped"
  elif ((rc == 75)); then # main.py's EXIT_IN_USE: another process (a second sweep, say) holds the run's folder
    status="BUSY (another process is training or checking it; rerun the sweep once it has ended)"
  elif [[ -n $finished ]]; then
    # main.py's line says which: a recipe other than this sweep's, an unreadable checkpoint, or (when every run had
    # finished, so that no dry run checked the flags first) a flag main.py does not take
    status="FAILED (finished already, but main.py --resume refused it: exit $rc${log:+, see $log}; other settings"
    status+=" (use another --runs_dir), an unreadable checkpoint or a bad flag)"
  elif ((interrupted)) && [[ ! -e $run_dir/results.json ]]; then
    status="INTERRUPTED (exit $rc)"
  elif ((interrupted)); then
    status="done" # it wrote results.json before the interrupt reached it, then exited with the signal's status
  elif ((rc != 0)); then
    status="FAILED (exit $rc${log:+, see $log})"
  elif [[ ! -e $run_dir/results.json ]]; then
    status="FAILED (exit 0 but no results.json)"
  else
    status="done"
  fi
  echo "[$name] $status"
  echo "$status" >"$status_file"
}

# Starts command $3.. for run $1 on GPU $2 and returns its exit status. The run is a background
# job so that an interrupt reaches the sweep at once (bash runs traps only between foreground
# commands) and is passed on as ONE SIGTERM: main.py stops after the current step, saves
# last.pt, and treats a second signal as "stop now". Job control (set -m, below) puts the run
# in its own process group, away from the terminal's Ctrl-C.
launch_and_wait() {
  local idx=$1 gpu=$2 pid rc=0
  shift 2
  (
    [[ -z $gpu ]] || export CUDA_VISIBLE_DEVICES=$gpu
    exec "$@" </dev/null # stdin: a background process group that reads the terminal is stopped
  ) &
  pid=$!
  echo "$pid" >"$state_dir/pid.$idx"
  # An interrupt between the start and the line above found no pid file: stop the run here.
  [[ ! -e $state_dir/stop ]] || signal_run_once "$idx" "$pid"
  wait "$pid" || rc=$?
  # wait also returns when a trapped signal arrives (the run may still be saving its checkpoint)
  # and, under job control, when the run is stopped (kill -STOP, to lend the machine to something
  # else for a while): then at once again at each call until it continues, so pause before each
  # new wait rather than spin a core for as long as the run stays stopped.
  while kill -0 "$pid" 2>/dev/null; do
    sleep 0.5
    rc=0
    wait "$pid" || rc=$?
  done
  rm -f "$state_dir/pid.$idx"
  return "$rc"
}

# SIGTERM to run $1 (pid $2) unless it has had one: the interrupt handler and launch_and_wait may
# both try, and mkdir lets exactly one of them succeed.
signal_run_once() {
  if mkdir "$state_dir/signalled.$1" 2>/dev/null; then
    kill -TERM "$2" 2>/dev/null || true
  fi
}

# One worker per GPU slot (or one in the foreground): take runs from the queue until it is empty.
run_queue() {
  local gpu=$1 idx
  while [[ ! -e $state_dir/stop ]] && idx=$(claim_next_run); do
    run_one "$idx" "$gpu"
  done
}

# On Ctrl-C / SIGTERM: take no new runs and ask the running ones to stop (one SIGTERM each).
on_interrupt() {
  touch "$state_dir/stop"
  echo "$prog: interrupted: stopping; rerun the same command to resume" >&2
  local pid_file pid
  for pid_file in "$state_dir"/pid.*; do
    pid=$(<"$pid_file") 2>/dev/null || continue # the run ended meanwhile
    [[ -z $pid ]] || signal_run_once "${pid_file##*.}" "$pid"
  done
}
# A shell started with '&' by a shell without job control (a script, 'nohup cmd &' in one) begins
# with SIGINT ignored, and bash cannot trap a signal that was ignored when it started.
sigint_ignored="^trap -- '' (SIG)?INT\$" # bash's POSIX mode prints INT, not SIGINT
if [[ $(trap -p INT) =~ $sigint_ignored ]]; then
  echo "$prog: note: SIGINT was ignored when this sweep started, so Ctrl-C cannot stop it; 'kill $$' (SIGTERM) can" >&2
fi

trap on_interrupt INT TERM
set -m # job control: each run (and each GPU worker) in its own process group, see launch_and_wait

# Dry runs first (main.py --dry_run: the flags, the device, the data and its long-tailed split), as each run with
# training left whose imb_factor or method no earlier one had (a Table-1 sweep of three factors and two methods: four),
# each in a scratch folder that is never created: a typo after --, a wrong --data_root or a factor that leaves a class
# without images then says so once, before any run starts, instead of failing run after run (with --gpus, each in
# its own log), and a note only one method's flags raise (--loss ce does not read --temp) is seen. Seconds each once
# the data is decoded; none when every run has finished (checking finished runs reads no data, but for one whose
# results.json main.py finds damaged and writes again).
declare -A dry_run_factor=() dry_run_method=() notes_said=()
dry_runs=()
for ((idx = 0; idx < n_runs; idx++)); do
  [[ -f $runs_dir/${run_names[idx]}/results.json ]] && continue
  [[ -n ${dry_run_factor[${run_factors[idx]}]+x} && -n ${dry_run_method[${run_methods[idx]}]+x} ]] && continue
  dry_run_factor[${run_factors[idx]}]=1 dry_run_method[${run_methods[idx]}]=1
  dry_runs+=("$idx")
done
# With --gpus the dry runs take the listed entries (each once, where one is listed twice) in turn, and each entry
# none of them took gets one more (as the first of them): a wrong id later in the list (a GPU this machine lacks)
# would else start its runs on the CPU.
declare -A listed=()
dry_run_gpus=()
for gpu in ${gpu_list[@]+"${gpu_list[@]}"}; do
  [[ -n ${listed[$gpu]+x} ]] || dry_run_gpus+=("$gpu")
  listed[$gpu]=1
done
n_gpus=${#dry_run_gpus[@]}
for ((k = ${#dry_runs[@]}; ${#dry_runs[@]} && k < n_gpus; k++)); do
  dry_runs+=("${dry_runs[0]}")
done
for ((k = 0; k < ${#dry_runs[@]}; k++)); do
  idx=${dry_runs[k]} gpu="" on_gpu=""
  ((n_gpus == 0)) || gpu=${dry_run_gpus[k % n_gpus]} on_gpu=" on --gpus entry $gpu"
  echo "$prog: checking the flags, the device and the data: main.py --dry_run as ${run_names[idx]}$on_gpu"
  run_command "$idx" "$state_dir/dry_run"
  rc=0
  launch_and_wait dry "$gpu" "${cmd[@]}" ${extra_args[@]+"${extra_args[@]}"} --dry_run \
    >"$state_dir/dry_run.out" || rc=$?
  if [[ -e $state_dir/stop ]]; then
    echo "$prog: interrupted" >&2
    exit 130
  elif ((rc)); then
    why="exit $rc; its message, if it printed one, is above"
    ((rc < 128)) || why="killed by signal $((rc - 128))"
    echo "$prog: error: main.py --dry_run as ${run_names[idx]} failed ($why): no run started" >&2
    exit 2
  fi
  # Its notes (flags that are legal but rarely meant, a CUDA_VISIBLE_DEVICES that hides every GPU) said here
  # once, where they are seen before the runs start: with --gpus each run's own copy goes to its log only.
  while IFS= read -r line; do
    # main.py's note that --device auto found no GPU although CUDA_VISIBLE_DEVICES names one: with --gpus the queue
    # would start this entry's runs on the CPU (with every entry wrong, one CPU run per entry at once).
    if ((n_gpus)) && [[ $line == "note: CUDA_VISIBLE_DEVICES="*" but no CUDA device is available"* ]]; then
      echo "$prog: error: --gpus, but main.py --dry_run as ${run_names[idx]}$on_gpu found no CUDA device ($line):" \
        "no run started; check the --gpus ids (nvidia-smi -L), or on a machine without GPUs leave --gpus out" >&2
      exit 2
    fi
    [[ $line == note:* && -z ${notes_said[$line]+x} ]] || continue
    notes_said[$line]=1  # one that every dry run prints (CUDA_VISIBLE_DEVICES) said once
    echo "$prog: main.py --dry_run as ${run_names[idx]}: $line"
  done <"$state_dir/dry_run.out"
done

if ((${#gpu_list[@]})); then
  echo "$prog: $n_runs $runs_word in $runs_dir, queue over GPUs: ${gpu_list[*]}"
  for gpu in "${gpu_list[@]}"; do
    run_queue "$gpu" &
  done
  # wait returns early (>128) when a trapped signal arrives; keep waiting for the workers.
  until wait; do :; done
else
  echo "$prog: $n_runs $runs_word in $runs_dir, one after another"
  run_queue ""
fi

# ---- summary ---------------------------------------------------------------------------------
n_bad=0 n_busy=0
echo
echo "$prog: summary ($n_runs $runs_word)"
for ((idx = 0; idx < n_runs; idx++)); do
  status="not started"
  [[ ! -e $state_dir/status.$idx ]] || status=$(<"$state_dir/status.$idx")
  # "not started" without an interrupt means a worker died: count it as a failure too.
  case $status in
    FAILED* | INTERRUPTED* | "not started") n_bad=$((n_bad + 1)) ;;
    BUSY*) n_busy=$((n_busy + 1)) ;;
  esac
  printf '  %-50s %s\n' "$runs_dir/${run_names[idx]}" "$status"
done
if [[ -e $state_dir/stop ]]; then
  echo "$prog: interrupted" >&2
  exit 130
elif ((n_bad)); then
  busy_note=""
  ((n_busy == 0)) || busy_note=", $n_busy BUSY in another process"
  echo "$prog: $n_bad of $n_runs $runs_word FAILED$busy_note" >&2
  exit 1
elif ((n_busy)); then
  echo "$prog: $n_busy of $n_runs $runs_word BUSY in another process" >&2
  exit 75
fi
exit 0
}
