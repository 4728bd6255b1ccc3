#!/usr/bin/env bash
# Training speed race: our DAGMM (burn, flex backend) against the PyTorch reference in
# ../shared/bench/pytorch_dagmm.py, same data, same network, same thread count.
#  1. KDDCUP99, paper configuration, EPOCHS epochs.
#  2. The 4-metric server scenario: 1000 samples of one generated host, the `fit` network
#     (4-16-8-1, 3-10-4), batch 1024, 1000 epochs; PyTorch through benches/race_metrics4.py.
#
#   benches/race_pytorch.sh [EPOCHS] [THREADS] [ROUNDS] [SCENARIOS]
#
# Defaults: 10 epochs, 1 thread, 3 rounds, both scenarios (SCENARIOS: kdd, metrics4 or both).
# To race on another machine without a Rust toolchain, point DAGMM_TRAIN at a release
# `dagmm-train` built for it (nothing is built then) and DAGMM_SHARED at a folder holding
# datasets/kddcup99/kdd_cup.{npz,parquet} and bench/pytorch_dagmm.py (default ../shared).
#
# Each round times ours and then PyTorch, so both see the machine in the same state; a
# round's ratio compares the two, and the summary gives the median and range over the rounds.
# (On a shared VM one PyTorch run can take 0.88 s per epoch and the next 1.16 s.)
#
# Needs torch, numpy and scipy in $DAGMM_TORCH_VENV (default /tmp/torch-venv):
#   python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch numpy scipy
# KDDCUP99: both sides' seconds per epoch are the mean over all EPOCHS epochs of one run, each
# epoch's shuffle and steps (ours: `epoch_seconds` in the evaluate report; PyTorch: its own
# train_seconds / epochs), so reading data and the one-off work after training (mixture over
# the whole training set, energies, scoring) are not counted. Ours runs without its
# reconstruction-only warm-up (--warmup 0): every epoch then takes the joint loss's steps, as
# every one of the reference's does.
# 4 metrics: ours is the slope between `fit` runs of 100 and 1100 epochs (no warm-up either).
set -euo pipefail
cd "$(dirname "$0")/.."

epochs="${1:-10}"
threads="${2:-1}"
rounds="${3:-3}"
if ! [[ "$rounds" =~ ^[1-9][0-9]*$ ]]; then
    echo "ROUNDS must be a positive whole number, got '$rounds'" >&2
    exit 2
fi
scenarios="${4:-both}"
case "$scenarios" in
    kdd | metrics4 | both) ;;
    *)
        echo "SCENARIOS must be kdd, metrics4 or both, got '$scenarios'" >&2
        exit 2
        ;;
esac
venv="${DAGMM_TORCH_VENV:-/tmp/torch-venv}"
shared="${DAGMM_SHARED:-../shared}"
reference="$shared/bench/pytorch_dagmm.py"
data_npz="$shared/datasets/kddcup99/kdd_cup.npz"
data_parquet="$shared/datasets/kddcup99/kdd_cup.parquet"

if [[ -n "${DAGMM_TRAIN:-}" ]]; then
    dagmm_train="$DAGMM_TRAIN"
else
    cargo build --release -q -p dagmm-train
    dagmm_train=./target/release/dagmm-train
fi
echo "dagmm-train: $dagmm_train; PyTorch $("$venv/bin/python3" -c 'import torch; print(torch.__version__)')"

# Mean seconds per epoch of one EPOCHS-epoch run, from the JSON report's epoch times.
kdd_ours() {
    local report
    report=$(mktemp)
    RAYON_NUM_THREADS="$threads" "$dagmm_train" evaluate --input "$data_parquet" \
        --preset kddcup --seeds 1 --epochs "$epochs" --warmup 0 --threshold top-ratio:0.2 \
        --json "$report" >/dev/null
    python3 -c "import json, statistics, sys; \
print(f\"{statistics.mean(json.load(open(sys.argv[1]))['runs'][0]['epoch_seconds']):.3f}\")" "$report"
    rm -f "$report"
}
# Prints ROUNDS rounds of "ours, then theirs" and the median and range of the ratios.
#   race UNIT OURS_COMMAND THEIRS_COMMAND   (each command prints seconds)
race() {
    local unit=$1 ours_command=$2 theirs_command=$3 ratios="" round ours theirs ratio
    for round in $(seq 1 "$rounds"); do
        ours=$($ours_command)
        theirs=$($theirs_command)
        ratio=$(python3 -c "print(f'{$theirs / $ours:.2f}')")
        ratios="$ratios $ratio"
        echo "  round $round: dagmm (burn flex) $ours $unit, PyTorch reference $theirs $unit, ratio ${ratio}x"
    done
    python3 -c "import statistics, sys; v = [float(x) for x in sys.argv[1:]]; \
print(f'  ratio (PyTorch / dagmm): median {statistics.median(v):.2f}x, range {min(v):.2f}-{max(v):.2f}x')" $ratios
}

kdd_theirs() {
    local seconds
    seconds=$("$venv/bin/python3" "$reference" --data "$data_npz" --epochs "$epochs" \
        --threads "$threads" --seed 0 --log-every 1000000 | awk '/^train_seconds/ {print $2}')
    python3 -c "print(f'{$seconds / $epochs:.3f}')"
}
if [[ "$scenarios" != metrics4 ]]; then
    echo "KDDCUP99, paper configuration, $epochs epochs, $threads thread(s), $rounds round(s)"
    race s/epoch kdd_ours kdd_theirs
fi
[[ "$scenarios" != kdd ]] || exit 0

# 2. The 4-metric scenario.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$dagmm_train" generate --out "$work/host.csv" --hosts 1 --days 1 \
    --anomalies-per-day 0 >/dev/null
fit_wall() {
    local start end
    start=$(date +%s.%N)
    RAYON_NUM_THREADS="$threads" "$dagmm_train" fit --input "$work/host.csv" \
        --last 1000 --out "$work/models" --epochs "$1" --warmup 0 -q >/dev/null
    end=$(date +%s.%N)
    python3 -c "print($end - $start)"
}
metrics_ours() {
    local short long
    short=$(fit_wall 100)
    long=$(fit_wall 1100)
    python3 -c "print(f'{($long - $short):.3f}')"
}
metrics_theirs() {
    "$venv/bin/python3" benches/race_metrics4.py --reference "$reference" \
        --data "$work/host.csv" --epochs 1000 --threads "$threads" | awk '/^train_seconds/ {print $2}'
}
echo "4 metrics, 1000 samples, 1000 epochs, $threads thread(s), $rounds round(s)"
race s metrics_ours metrics_theirs
