#!/usr/bin/env bash
# Prepared for a session with a GPU (the `device` tool), issue 12: the meta-training that worked on the CPU
# (whole-episode antithetic ES on the mix and schedule weights, --es-params mix-schedule) with a
# population 16 times larger (16 antithetic pairs, 32 students per meta-step, those of one student advanced
# together by one vmapped step: --vmap) over the student family and a horizon curriculum, on CUDA, 7 minutes, from the mix's
# initialization (regenerated here, bitwise the one behind checkpoints/operator.pt). First one meta-step of
# 200-step episodes with the loop and with --vmap (their wall times: the population's speed-up). Writes
# meta-validation against wall time and the operator to $OUT. Not yet run on a GPU (none was lent to the sessions that wrote it).
# Budget: ~10 of the 15 device minutes (teacher logits ~20 s).
# Usage there: DATA=.devcarry/cifar10-jpeg.tar.gz OUT=/some/dir bash scripts/gpu_es.sh
# Dry run without a GPU (every command, on the CPU, at toy sizes: ~3 min): DRY=1 DATA=../shared/data/cifar10-jpeg.tar.gz bash scripts/gpu_es.sh
set -u
export PYTHONUNBUFFERED=1 L2O_KD_CACHE=${L2O_KD_CACHE:-/tmp/l2o_cache} PYTHONPATH=$PWD
DATA=${DATA:-.devcarry/cifar10-jpeg.tar.gz}
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
if [ -n "${DRY:-}" ]; then
  DEVICE=cpu PAIRS=1 PROBE_LEN=10 PROBE_VAL=5 CURRICULUM=20,30 ES_EVAL=256 VAL_HORIZON=10 META_STEPS=2 MINUTES=2
else
  DEVICE=cuda PAIRS=16 PROBE_LEN=200 PROBE_VAL=100 CURRICULUM=1000,3000 ES_EVAL=5000 VAL_HORIZON=1000 META_STEPS=40 MINUTES=7
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $OUT/log.txt
fi
rm -rf /tmp/runs/probe-loop /tmp/runs/probe-vmap /tmp/runs/es-gpu  # fresh runs, not resumed ones
start=$(date +%s)
python3 scripts/new_operator.py --per-coordinate mlp --normalize-update --rms-floor 1e-3 --mix \
  --head-from checkpoints/operator-lstm-es-schedule.pt --out /tmp/operator-mix-init.pt | tee -a $OUT/log.txt
for mode in loop vmap; do  # one meta-step of $PAIRS pairs each way (meta-validation at $PROBE_VAL steps, 1 seed)
  t0=$(date +%s)
  timeout 120 python3 -m l2o_kd meta-train --data-root $DATA --device $DEVICE --method es --es-params mix-schedule \
    --init /tmp/operator-mix-init.pt --curriculum $PROBE_LEN --pairs $PAIRS --sigma 0.3 --students tiny --validate-every 5 \
    --val-horizon $PROBE_VAL --val-seeds 1000 --meta-steps 1 --runs-dir /tmp/runs --run-name probe-$mode $([ $mode = vmap ] && echo --vmap) \
    --no-progress 2>&1 | tail -2 | tee -a $OUT/log.txt
  echo "one meta-step, $PAIRS pairs of $PROBE_LEN steps, $mode: $(( $(date +%s) - t0 )) s (with start-up and 2 validation runs)" | tee -a $OUT/log.txt
done
timeout 460 python3 -m l2o_kd meta-train --data-root $DATA --device $DEVICE --method es --es-params mix-schedule \
  --init /tmp/operator-mix-init.pt --curriculum $CURRICULUM --pairs $PAIRS --sigma 0.3 --meta-lr 0.05 --clip 100 \
  --es-eval $ES_EVAL --es-objective error --students tiny,tiny_wide,tiny_deep --validate-every 5 --val-horizon $VAL_HORIZON \
  --val-seeds 1000,1001,1002,1003 --adam-lr 0.00949 --meta-steps $META_STEPS --minutes $MINUTES --runs-dir /tmp/runs --run-name es-gpu \
  --out $OUT/operator-es-gpu.pt --vmap --no-progress \
  2>&1 | tail -5 | tee -a $OUT/log.txt
echo "es wall $(( $(date +%s) - start )) s" | tee -a $OUT/log.txt
cp /tmp/runs/es-gpu/metrics.jsonl $OUT/es_metrics.jsonl
tar czf $OUT/es-events.tar.gz --exclude='*.pt' -C /tmp/runs es-gpu
