#!/usr/bin/env bash
# Prepared for a session with a GPU (the `device` tool), issues 6 and 15: wall time of one deploy epoch and of
# meta-training steps, CPU vs CUDA (and bf16 --amp on CUDA), same machine, same commands; then the step-cost
# ratios of scripts/bench_operators.py on CUDA. Not yet run on a GPU (none was lent to the sessions that wrote it).
# Usage there: DATA=.devcarry/cifar10-jpeg.tar.gz OUT=/some/dir bash scripts/gpu_timing.sh
# Dry run without a GPU (every command once, on the CPU): DEVICES=cpu DATA=../shared/data/cifar10-jpeg.tar.gz bash scripts/gpu_timing.sh
set -u
export PYTHONUNBUFFERED=1 L2O_KD_CACHE=${L2O_KD_CACHE:-/tmp/l2o_cache} PYTHONPATH=$PWD
DATA=${DATA:-.devcarry/cifar10-jpeg.tar.gz}
OUT=${OUT:-/tmp/out}
DEVICES=${DEVICES:-cuda cpu}
mkdir -p $OUT
rm -rf /tmp/runs/epoch-* /tmp/runs/meta-*  # fresh runs, not resumed ones
for dev in $DEVICES; do
  for name in adam operator; do  # Adam at its flags; the shipped learned operator chooses its own steps and (beta, T)
    flags="--operator adam --lr 3e-3 --beta 0.5 --temperature 4"
    [ $name = operator ] && flags="--optimizer checkpoints/operator.pt"
    python3 -m l2o_kd deploy --student tiny $flags --epochs 1 --data-root $DATA --device $dev \
      --runs-dir /tmp/runs --run-name epoch-$dev-$name --no-progress | sed "s/^/deploy $dev $name: /" | tee -a $OUT/timing.txt
  done
  start=$(date +%s%N)
  python3 -m l2o_kd meta-train --data-root $DATA --meta-steps 10 --unroll 20 --curriculum 1000 --validate-every 1000 \
    --val-horizon 10 --device $dev --runs-dir /tmp/runs --run-name meta-$dev --no-progress > /dev/null
  echo "meta-train $dev: 10 meta-steps of 20 unrolled steps (incl. one short validation): $(( ($(date +%s%N) - start) / 1000000 )) ms" | tee -a $OUT/timing.txt
done
case " $DEVICES " in *" cuda "*)
  python3 -m l2o_kd deploy --student tiny --operator adam --lr 3e-3 --epochs 1 --data-root $DATA --device cuda --amp \
    --runs-dir /tmp/runs --run-name epoch-cuda-adam-amp --no-progress | sed "s/^/deploy cuda adam --amp: /" | tee -a $OUT/timing.txt
  python3 scripts/bench_operators.py --device cuda | tee -a $OUT/timing.txt ;;
esac
