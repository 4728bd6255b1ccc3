#!/usr/bin/env bash
# HTTP load benchmark of `dagmm-serve serve` with wrk (Debian package `wrk`).
#
# Trains a model on the sample data, starts a release server on a loopback port and drives
# POST /v1/score with 1 and 64 samples per request. Prints requests/s, latency percentiles,
# errors, and the server's RSS before and after each run.
#
#   benches/http_load.sh [DURATION_SECONDS] [CONNECTIONS] [WRK_THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."

duration="${1:-60}"
connections="${2:-32}"
threads="${3:-1}"
port="${DAGMM_BENCH_PORT:-18181}"
work="$(mktemp -d)"
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT

command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }
cargo build --release -q -p dagmm-train -p dagmm-serve
./target/release/dagmm-train fit --input datasets/sample/metrics.parquet --out "$work/models" \
    --name web-01 --epochs 200 -q >/dev/null

DAGMM_LOG=warn ./target/release/dagmm-serve serve --models "$work/models" --addr "127.0.0.1:$port" &
server=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done

sample='{"cpu_usage":41.5,"mem_usage":52.0,"disk_busy":7.5,"net_in_bps":2.1e6}'
batch="{\"samples\":[$(printf "$sample,%.0s" $(seq 63))$sample]}"

rss() { awk '/VmRSS/ {print $2 " kB"}' "/proc/$server/status"; }

for name in single batch64; do
    body="$sample"; [ "$name" = batch64 ] && body="$batch"
    cat > "$work/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '$body'
wrk.headers["content-type"] = "application/json"
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format("RESULT requests/s %.0f  p50 %.3f ms  p99 %.3f ms  errors %d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, errors))
end
LUA
    echo "== $name: ${duration}s, $connections connections, $threads wrk thread(s); server RSS before: $(rss)"
    wrk -t"$threads" -c"$connections" -d"${duration}s" --latency -s "$work/post.lua" \
        "http://127.0.0.1:$port/v1/score" | grep -E "RESULT|Non-2xx"
    echo "   server RSS after: $(rss)"
done
