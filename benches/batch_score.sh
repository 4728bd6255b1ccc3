#!/usr/bin/env bash
# End-to-end batch-scoring benchmark: rows/s (read + score + write) and peak RSS of
# `dagmm-serve score` on generated 100-host exports of 1 M and 10 M rows, explaining every row
# (the default) and only flagged rows (`--explain anomalies`).
#
#   benches/batch_score.sh [SIZES...]     (default: 1000000 10000000)
set -euo pipefail
cd "$(dirname "$0")/.."

sizes=("$@")
[ ${#sizes[@]} -eq 0 ] && sizes=(1000000 10000000)
work="${DAGMM_BENCH_DIR:-$(mktemp -d)}"
mkdir -p "$work"

cargo build --release -q -p dagmm-train -p dagmm-serve
./target/release/dagmm-train fit --input datasets/sample/metrics.parquet --out "$work/models" \
    --name fleet --epochs 200 -q >/dev/null

for rows in "${sizes[@]}"; do
    hosts=100
    days=$(python3 -c "print($rows / $hosts / 1440)")
    input="$work/export-$rows.parquet"
    [ -f "$input" ] || ./target/release/dagmm-train generate --out "$input" --hosts $hosts --days "$days" >/dev/null
    for explain in all anomalies; do
        echo "== $rows rows ($hosts hosts), $(du -h "$input" | cut -f1) of Parquet, --explain $explain"
        # A fresh output path: replacing an existing file adds the filesystem's work of
        # dropping the old one (about 0.2 s for 700 MB on ext4), which is not scoring.
        rm -f "$work/scored-$rows.parquet"
        sync
        /usr/bin/time -v ./target/release/dagmm-serve score --models "$work/models/fleet.dagmm" \
            --input "$input" --output "$work/scored-$rows.parquet" --explain "$explain" -q \
            2> "$work/time-$rows.txt" | head -1
        grep -E "Maximum resident set size|Elapsed \(wall clock\)" "$work/time-$rows.txt"
    done
done
