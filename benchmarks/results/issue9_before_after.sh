#!/bin/bash
# Interleaved before/after runs of the issue-9 benchmarks; last JSON line of each run to /tmp/ab/*.json
PY=/work/main/.venv/bin/python
mkdir -p /tmp/ab
for round in 1 2; do
  for bench in "bench_loss.py --quick" "bench_read.py --quick" "step_overhead.py --quick --http" "bench_server.py --quick"; do
    name=$(echo $bench | cut -d' ' -f1 | sed 's/.py//')
    for side in before after; do
      if [ $side = before ]; then dir=/tmp/kd_before; else dir=/work/main; fi
      start=$(date +%s)
      (cd $dir && PYTHONPATH=$dir $PY benchmarks/$bench > /tmp/ab/${name}_${side}_${round}.log 2>&1)
      echo "$name $side $round rc=$? $(( $(date +%s) - start ))s" >> /tmp/ab/progress.txt
      tail -1 /tmp/ab/${name}_${side}_${round}.log > /tmp/ab/${name}_${side}_${round}.json
    done
  done
done
echo done >> /tmp/ab/progress.txt
