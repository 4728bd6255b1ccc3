#!/usr/bin/env bash
# Training speed race on KDDCUP99: our DAGMM (burn, flex backend) against the PyTorch reference
# in ../shared/bench/pytorch_dagmm.py, same data, paper configuration, same thread count.
#
#   benches/race_pytorch.sh [EPOCHS] [THREADS]      (defaults: 10 epochs, 1 thread)
#
# Needs torch, numpy and scipy in $DAGMM_TORCH_VENV (default /tmp/torch-venv):
#   python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch numpy scipy
# Ours: seconds per epoch is the slope between 2 and 2+EPOCHS epochs, so the one-off work after
# training (mixture over the whole training set, energies, test scoring) is not counted.
# PyTorch: its own train_seconds / epochs.
set -euo pipefail
cd "$(dirname "$0")/.."

epochs="${1:-10}"
threads="${2:-1}"
venv="${DAGMM_TORCH_VENV:-/tmp/torch-venv}"
data_npz=../shared/datasets/kddcup99/kdd_cup.npz
data_parquet=../shared/datasets/kddcup99/kdd_cup.parquet

cargo build --release -q -p dagmm-train -p dagmm-serve

fit_seconds() {
    RAYON_NUM_THREADS="$threads" ./target/release/dagmm-train evaluate --input "$data_parquet" \
        --preset kddcup --seeds 1 --epochs "$1" --threshold top-ratio:0.2 \
        | sed -n 's/.* \([0-9.]*\) s per fit$/\1/p'
}
short=$(fit_seconds 2)
long=$(fit_seconds $((epochs + 2)))
ours=$(python3 -c "print(f'{($long - $short) / $epochs:.3f}')")

torch_line=$("$venv/bin/python" ../shared/bench/pytorch_dagmm.py --data "$data_npz" --epochs "$epochs" \
    --threads "$threads" --seed 0 --log-every 1000000 | grep '^train_seconds')
torch_seconds=$(echo "$torch_line" | awk '{print $2}')
theirs=$(python3 -c "print(f'{$torch_seconds / $epochs:.3f}')")

echo "KDDCUP99, paper configuration, $epochs epochs, $threads thread(s)"
echo "  dagmm (burn flex): $ours s/epoch"
echo "  PyTorch reference: $theirs s/epoch"
python3 -c "print(f'  ratio (PyTorch / dagmm): {$theirs / $ours:.2f}x')"
