#!/bin/sh
# kdcache-build-per-gpu: run `kdcache build ARGS...` as one process per GPU of this host and wait for all.
#
#   kdcache-build-per-gpu --teacher /models/teacher --data /data/tokens.npy --topk 32 --seq-len 2048 \
#       --device cuda --dtype bfloat16 --out /caches/cache
#
# Process i sees only GPU i (CUDA_VISIBLE_DEVICES, so `--device cuda` is that GPU) and gets RANK=i and
# WORLD_SIZE=<number of GPUs>, which `kdcache build` reads as its --rank/--world-size defaults: rank i writes
# shards i, i+N, i+2N, ... and the last rank to finish writes the manifest. GPUs: $KDCACHE_GPUS (e.g. "0,2"),
# else $CUDA_VISIBLE_DEVICES, else every GPU `nvidia-smi -L` lists. Exit status: 0 when every rank succeeded,
# else the first failing rank's status. Rerunning resumes every rank. SIGTERM/SIGINT are passed on.
# Several hosts sharing one --out directory: run `kdcache build ... --rank R --world-size W` per GPU instead.
set -u
# GPU numbers mean what nvidia-smi shows (CUDA would otherwise order the fastest GPU first)
export CUDA_DEVICE_ORDER="${CUDA_DEVICE_ORDER:-PCI_BUS_ID}"

gpus="${KDCACHE_GPUS:-${CUDA_VISIBLE_DEVICES:-}}"
if [ -z "$gpus" ]; then
    gpus="$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr -d ' ' | paste -sd, -)"
fi
if [ -z "$gpus" ]; then
    echo "kdcache-build-per-gpu: no GPUs found (nvidia-smi lists none); set KDCACHE_GPUS=0,1,... or run" \
         "the container with --gpus all" >&2
    exit 2
fi

world_size=$(printf '%s\n' "$gpus" | tr ',' '\n' | grep -c .)
echo "kdcache-build-per-gpu: ${world_size} ranks on GPUs ${gpus}" >&2
pids=""
rank=0
for gpu in $(printf '%s\n' "$gpus" | tr ',' ' '); do
    CUDA_VISIBLE_DEVICES="$gpu" RANK="$rank" WORLD_SIZE="$world_size" kdcache build "$@" &
    pids="$pids $!"
    rank=$((rank + 1))
done
trap 'kill -TERM $pids 2>/dev/null' TERM INT

status=0
rank=0
for pid in $pids; do
    # `wait` returns >128 when a trapped signal interrupts it: wait again for the rank's own exit status
    while :; do
        wait "$pid"
        code=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    if [ "$code" -ne 0 ]; then
        echo "kdcache-build-per-gpu: rank ${rank} exited with status ${code}" >&2
        [ "$status" -eq 0 ] && status=$code
    fi
    rank=$((rank + 1))
done
exit "$status"
