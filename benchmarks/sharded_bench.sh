#!/usr/bin/env bash
# One bench preset as N processes sharing its output folder (`petlkit bench --shard I/N`),
# then its report from every shard's records. On a GPU, MiniLM- or ViT-sized runs leave the
# device mostly idle; N processes at once keep it busy.
#   usage: benchmarks/sharded_bench.sh PRESET OUTPUT [N] [more petlkit bench flags]
#   e.g.   PYTHONPATH=src benchmarks/sharded_bench.sh text-lowres results/text-lowres 8
# PETLKIT (default: python -m petlkit) is the command that runs petlkit.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 PRESET OUTPUT [N] [petlkit bench flags]" >&2
    exit 2
fi
preset=$1 output=$2 shards=${3:-1}
shift $(( $# < 3 ? $# : 3 ))
petlkit=${PETLKIT:-python -m petlkit}
mkdir -p "$output"
pids=()
for ((i = 0; i < shards; i++)); do
    $petlkit bench --preset "$preset" --output "$output" --shard "$i/$shards" "$@" \
        > "$output/shard-$i.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
if [ "$status" -ne 0 ]; then
    echo "a shard failed: see $output/shard-*.log; rerun to resume" >&2
    tail -n 5 "$output"/shard-*.log >&2
    exit 1
fi
$petlkit bench --preset "$preset" --output "$output" --report-only "$@"
