#!/usr/bin/env bash
# Prepared for a session with a GPU (the `device` tool), issue 6: wall time of one deploy epoch and of
# meta-training steps, CPU vs CUDA (and bf16 --amp on CUDA), same machine, same commands. Not yet run
# (no GPU was lent to the sessions that wrote it).
# Usage there: DATA=.devcarry/cifar10-jpeg.tar.gz OUT=/some/dir bash scripts/gpu_timing.sh
set -u
export PYTHONUNBUFFERED=1 L2O_KD_CACHE=/tmp/l2o_cache PYTHONPATH=$PWD
DATA=${DATA:-.devcarry/cifar10-jpeg.tar.gz}
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
for dev in cuda cpu; do
  for op in adam checkpoints/operator.pt; do
    name=$(basename $op .pt)
    python3 -m l2o_kd deploy --student tiny --beta 0.5 --temperature 4 --operator adam --lr 3e-3 \
      $( [ "$op" != adam ] && echo --optimizer $op ) --epochs 1 --data-root $DATA --device $dev \
      --runs-dir /tmp/runs --run-name epoch-$dev-$name --no-progress | sed "s/^/deploy $dev $name: /" | tee -a $OUT/timing.txt
  done
  start=$(date +%s.%N)
  python3 -m l2o_kd meta-train --data-root $DATA --meta-steps 10 --unroll 20 --curriculum 1000 --validate-every 1000 \
    --val-horizon 10 --device $dev --runs-dir /tmp/runs --run-name meta-$dev --no-progress > /dev/null
  echo "meta-train $dev: 10 meta-steps of 20 unrolled steps (incl. one short validation): $(echo "$(date +%s.%N) - $start" | bc) s" | tee -a $OUT/timing.txt
done
python3 -m l2o_kd deploy --student tiny --operator adam --lr 3e-3 --epochs 1 --data-root $DATA --device cuda --amp \
  --runs-dir /tmp/runs --run-name epoch-cuda-adam-amp --no-progress | sed "s/^/deploy cuda adam --amp: /" | tee -a $OUT/timing.txt
python3 scripts/bench_operators.py --device cuda | tee -a $OUT/timing.txt
