#!/usr/bin/env bash
# One prepared GPU session (the `device` tool): train the shipped resnet20 teacher, then the paper-protocol
# baselines of the tiny student (no KD and KD beta=0.5,T=4; 2 seeds; 30 epochs), 4 runs in parallel.
# Usage there: DATA=.devcarry/cifar10-jpeg.tar.gz OUT=/some/dir bash scripts/gpu_teacher_and_baselines.sh
set -u
export PYTHONUNBUFFERED=1 L2O_KD_CACHE=/tmp/l2o_cache PYTHONPATH=$PWD
PY=${PY:-python3}
DATA=${DATA:-.devcarry/cifar10-jpeg.tar.gz}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-40}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a $OUT/log.txt
$PY -c "import torch; print('torch', torch.__version__)" | tee -a $OUT/log.txt
start=$(date +%s)
timeout 400 $PY -m l2o_kd train-teacher --model resnet20 --data-root $DATA --epochs $TEACHER_EPOCHS --nesterov \
  --weight-decay 5e-4 --lr 0.2 --schedule onecycle --augment --device cuda --runs-dir /tmp/runs --run-name teacher-resnet20 \
  --no-progress 2>&1 | tee -a $OUT/log.txt
echo "teacher wall $(( $(date +%s) - start )) s" | tee -a $OUT/log.txt
cp /tmp/runs/teacher-resnet20/checkpoint.pt $OUT/teacher-resnet20.pt
cp /tmp/runs/teacher-resnet20/metrics.jsonl $OUT/teacher_metrics.jsonl
$PY -m l2o_kd evaluate $OUT/teacher-resnet20.pt --data-root $DATA --device cuda --json | tee -a $OUT/log.txt
start=$(date +%s)
for seed in 0 1; do
  for beta in 0 0.5; do
    timeout 300 $PY -m l2o_kd deploy --student tiny --teacher $OUT/teacher-resnet20.pt --beta $beta --temperature 4 \
      --operator sgd --momentum 0 --lr 1.0 --schedule step --lr-step-epochs 10 --lr-gamma 0.5 --epochs 30 \
      --seed $seed --data-root $DATA --device cuda --runs-dir /tmp/runs --run-name tiny-paper-b$beta-s$seed --no-progress \
      > /tmp/deploy-b$beta-s$seed.log 2>&1 &
  done
done
wait
cat /tmp/deploy-*.log | tee -a $OUT/log.txt
echo "baselines wall $(( $(date +%s) - start )) s (4 runs in parallel)" | tee -a $OUT/log.txt
rm -f /tmp/runs/*/checkpoint.pt.tmp*
tar czf $OUT/runs.tar.gz -C /tmp runs --exclude='teacher-resnet20/checkpoint.pt'
