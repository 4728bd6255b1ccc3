#!/usr/bin/env bash
# Throughput of `dagmm-serve stream`: samples/s from a JetStream backlog to stored verdicts,
# with 1 and 2 replicas and 1 or 64 samples per message, all on this machine (the NATS server
# included).
#
#   benches/stream_throughput.sh [SAMPLES]     (default: 200000 per run)
#
# Needs nats-server (apt-get install nats-server) and Python 3; nats-py is installed into a
# virtual environment under the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."

samples="${1:-200000}"
work="${DAGMM_BENCH_DIR:-$(mktemp -d)}"
mkdir -p "$work"

cargo build --release -q -p dagmm-train -p dagmm-serve
[ -f "$work/models/fleet.dagmm" ] || ./target/release/dagmm-train fit \
    --input datasets/sample/metrics.parquet --out "$work/models" --name fleet --epochs 200 -q >/dev/null
[ -x "$work/venv/bin/python" ] || { python3 -m venv "$work/venv" && "$work/venv/bin/pip" install -q nats-py; }
py="$work/venv/bin/python"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rm -rf "$work/js"
nats-server -js -a 127.0.0.1 -p "$port" -sd "$work/js" >"$work/nats.log" 2>&1 &
nats_pid=$!
replicas=()
cleanup() {
    kill "${replicas[@]}" "$nats_pid" 2>/dev/null || true
}
trap cleanup EXIT
sleep 0.5
url="nats://127.0.0.1:$port"

echo "replicas  samples/message  samples/s  (backlog of $samples samples)"
for batch in 1 64; do
    for n in 1 2; do
        run="b${batch}r${n}"
        "$py" benches/nats_load.py publish "$url" "IN_$run" "$run.metrics" "$samples" "$batch"
        replicas=()
        for _ in $(seq "$n"); do
            DAGMM_LOG=warn ./target/release/dagmm-serve stream --models "$work/models/fleet.dagmm" \
                --nats "$url" --subjects "$run.metrics.>" --consumer scorers \
                --results "$run.scores" --results-stream "OUT_$run" \
                --dead-letter "$run.dead" --dead-letter-stream "DEAD_$run" &
            replicas+=($!)
        done
        rate=$("$py" benches/nats_load.py drain "$url" "OUT_$run" "$samples")
        kill -TERM "${replicas[@]}"
        wait "${replicas[@]}" 2>/dev/null || true
        printf "%8d  %15d  %9d\n" "$n" "$batch" "$rate"
    done
done
