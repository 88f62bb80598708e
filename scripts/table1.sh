#!/usr/bin/env bash
# The paper's Table 1 for one dataset: imbalance ratios 100, 50, 10 x Hybrid-SC, Hybrid-PSC
# (and the CE baseline with --ce). A thin wrapper: sweep.sh holds the sweep logic.
set -euo pipefail

prog=$(basename "$0")
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<EOF2
Usage: $prog --dataset cifar10|cifar100 [--ce] [--seeds "0 1 2"] [--runs_dir DIR] [--gpus "0 1"]
       [-- extra main.py args]

Runs imb_factor 0.01 0.02 0.1 (ratio 100, 50, 10) x methods sc psc (and ce with --ce), one run
folder each: DIR/<dataset>_<method>_r<ratio>_s<seed>. Finished runs are skipped (once main.py has
checked they were made with the settings given now; others are FAILED runs), unfinished ones
resumed; see scripts/sweep.sh --help for the details, --gpus and the extra arguments.

  --dataset D     cifar10 or cifar100 (required)
  --ce            also run the cross-entropy baseline
  --seeds S..     integer seeds (default: "0")
  --runs_dir DIR  (default: runs/table1)
  --gpus G..      a queue over these GPU ids (default: one run after another)
  -h, --help      this message

Then: python scripts/summarize.py DIR
EOF2
}

# main_flag ARG: whether ARG is one of main.py's flags (a field of its Config) that the sweep passes on after --.
main_flag() {
  local name=${1%%=*}
  name=${name#--}
  [[ $name =~ ^[a-z_]+$ && ! $name =~ ^(dataset|imb_type|imb_factor|loss|seed|output_dir|resume|overwrite|dry_run|eval_only|checkpoint)$ ]] &&
    grep -qE "^    $name: [^=]+= _opt\(" "$script_dir/../main.py" 2>/dev/null
}

die_usage() {
  echo "$prog: error: $1 (see --help)" >&2
  exit 2
}

dataset="" methods="sc psc" seeds="0" runs_dir="runs/table1"
pass_gpus=() extra_args=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --) shift; extra_args=("$@"); break ;;
    --ce) methods="sc psc ce"; shift ;;
    --dataset=* | --seeds=* | --runs_dir=* | --gpus=*)
      name=${1%%=*}; set -- "$name" "${1#*=}" "${@:2}"; continue ;;
    --dataset | --seeds | --runs_dir | --gpus)
      (($# >= 2)) || die_usage "$1 needs a value"
      case $1 in
        --dataset) dataset=$2 ;;
        --seeds) seeds=$2 ;;
        --runs_dir) runs_dir=$2 ;;
        --gpus) pass_gpus=(--gpus "$2") ;;
      esac
      shift 2 ;;
    *) main_flag "$1" && die_usage "unknown argument '$1' (a main.py flag: pass it after --)"
       die_usage "unknown argument '$1'" ;;
  esac
done
[[ -n $dataset ]] || die_usage "--dataset is required"

exec bash "$script_dir/sweep.sh" --dataset "$dataset" --imb_factors "0.01 0.02 0.1" \
  --methods "$methods" --seeds "$seeds" --runs_dir "$runs_dir" \
  ${pass_gpus[@]+"${pass_gpus[@]}"} -- ${extra_args[@]+"${extra_args[@]}"}
