#!/usr/bin/env bash
# Prepared for a session with a GPU (the `device` tool), issue 12: the meta-training that worked on the CPU
# (session 11: whole-episode antithetic ES on the mix and schedule weights, --es-params mix-schedule) with a
# population 16 times larger (16 antithetic pairs, 32 students per meta-step, those of one student advanced
# together by one vmapped step: --vmap) over the student family and a horizon curriculum, on CUDA, 7 minutes, from the mix's
# initialization (regenerated here, bitwise the one behind checkpoints/operator.pt). First one meta-step of
# 200-step episodes with the loop and with --vmap (their wall times: the population's speed-up). Writes
# meta-validation against wall time and the operator to $OUT. Not yet run (no GPU was lent to the sessions that wrote it).
# Budget: ~10 of the 15 device minutes (teacher logits ~20 s).
# Usage there: DATA=.devcarry/cifar10-jpeg.tar.gz OUT=/some/dir bash scripts/gpu_es.sh
set -u
export PYTHONUNBUFFERED=1 L2O_KD_CACHE=/tmp/l2o_cache PYTHONPATH=$PWD
DATA=${DATA:-.devcarry/cifar10-jpeg.tar.gz}
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $OUT/log.txt
start=$(date +%s)
python3 scripts/new_operator.py --per-coordinate mlp --normalize-update --rms-floor 1e-3 --mix \
  --head-from checkpoints/operator-lstm-es-schedule.pt --out /tmp/operator-mix-init.pt | tee -a $OUT/log.txt
for mode in loop vmap; do  # one meta-step of 16 pairs each way (meta-validation at 100 steps, 1 seed)
  t0=$(date +%s)
  timeout 120 python3 -m l2o_kd meta-train --data-root $DATA --device cuda --method es --es-params mix-schedule \
    --init /tmp/operator-mix-init.pt --curriculum 200 --pairs 16 --sigma 0.3 --students tiny --validate-every 5 --val-horizon 100 \
    --val-seeds 1000 --meta-steps 1 --runs-dir /tmp/runs --run-name probe-$mode $([ $mode = vmap ] && echo --vmap) --no-progress \
    2>&1 | tail -2 | tee -a $OUT/log.txt
  echo "one meta-step, 16 pairs of 200 steps, $mode: $(( $(date +%s) - t0 )) s (with start-up and 2 validation runs)" | tee -a $OUT/log.txt
done
timeout 460 python3 -m l2o_kd meta-train --data-root $DATA --device cuda --method es --es-params mix-schedule \
  --init /tmp/operator-mix-init.pt --curriculum 1000,3000 --pairs 16 --sigma 0.3 --meta-lr 0.05 --clip 100 \
  --es-eval 5000 --es-objective error --students tiny,tiny_wide,tiny_deep --validate-every 5 --val-horizon 1000 \
  --val-seeds 1000,1001,1002,1003 --adam-lr 0.00949 --meta-steps 40 --minutes 7 --runs-dir /tmp/runs --run-name es-gpu \
  --out $OUT/operator-es-gpu.pt --vmap --no-progress \
  2>&1 | tail -5 | tee -a $OUT/log.txt
echo "es wall $(( $(date +%s) - start )) s" | tee -a $OUT/log.txt
cp /tmp/runs/es-gpu/metrics.jsonl $OUT/es_metrics.jsonl
tar czf $OUT/es-events.tar.gz -C /tmp/runs es-gpu --exclude='*.pt'
