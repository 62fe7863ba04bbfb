#!/usr/bin/env bash
# Prepared for a session with a GPU (the `device` tool), issue 12: PES meta-training of the learned
# operator with a population of 16 antithetic pairs (64 students per meta-step, a loop: l2o-kd has no
# vmap'd population yet) on CUDA, 8 minutes, from the shipped (hierarchical) operator, its per-coordinate
# MLP, the head's output layer and its slopes perturbed (--es-params coord-mlp, 336 weights). Writes
# meta-validation against wall time and the operator to $OUT. Not yet run (no GPU was lent to the
# sessions that wrote it). Budget: ~10 of the 15 device minutes (teacher logits ~20 s).
# Usage there: DATA=.devcarry/cifar10-jpeg.tar.gz OUT=/some/dir bash scripts/gpu_pes.sh
set -u
export PYTHONUNBUFFERED=1 L2O_KD_CACHE=/tmp/l2o_cache PYTHONPATH=$PWD
DATA=${DATA:-.devcarry/cifar10-jpeg.tar.gz}
OUT=${OUT:-/tmp/out}
mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $OUT/log.txt
start=$(date +%s)
timeout 560 python3 -m l2o_kd meta-train --data-root $DATA --device cuda --method pes --es-params coord-mlp \
  --init checkpoints/operator.pt --unroll 50 --curriculum 1000 --pairs 16 --sigma 0.05 --meta-lr 0.01 --clip 1000 \
  --es-eval 1000 --students tiny,tiny_wide --validate-every 10 --val-horizon 1000 --val-seeds 1000,1001,1002,1003 \
  --meta-steps 100000 --minutes 8 --runs-dir /tmp/runs --run-name pes-gpu --out $OUT/operator-pes-gpu.pt --no-progress \
  2>&1 | tail -5 | tee -a $OUT/log.txt
echo "pes wall $(( $(date +%s) - start )) s" | tee -a $OUT/log.txt
cp /tmp/runs/pes-gpu/metrics.jsonl $OUT/pes_metrics.jsonl
tar czf $OUT/pes-events.tar.gz -C /tmp/runs pes-gpu --exclude='*.pt'
