#!/usr/bin/env bash
# Prepared for a session with a GPU (the `device` tool), issue 15: on CUDA, the step-cost ratios of
# scripts/bench_operators.py, then for `tiny` and `resnet8` the wall time of one deploy epoch (tuned Adam and the
# shipped learned operator, fp32 and bf16 --amp) and of ES meta-training of the shipped operator (2 meta-steps of
# one antithetic pair of 200-step episodes: 800 student steps). Not yet run on a GPU (none was lent to the sessions
# that wrote it). Each command is cut at LIMIT seconds (the benchmark at twice that) and none starts after DEADLINE
# seconds of the script (the last one is cut there), so the script ends inside the device call's timeout; everything
# lands in $OUT/timing.txt as it comes (each deploy's metrics rows in $OUT/metrics.jsonl, every command's stderr in
# $OUT/stderr.txt).
# Usage: here `mkdir -p .devcarry && cp ../shared/data/cifar10-jpeg.tar.gz .devcarry/` (ignored by git), then the device
# tool's run with carry [".devcarry"], timeout_s 560 (planned to take ~6 min on an H200) and the command
#   DATA=.devcarry/cifar10-jpeg.tar.gz OUT=$OUT bash scripts/gpu_timing.sh
# Dry run without a GPU: DEVICES=cpu LIMIT=400 DEADLINE=900 DATA=../shared/data/cifar10-jpeg.tar.gz bash scripts/gpu_timing.sh
# (~6 min on this project's 2-core CPU) runs every command but the CUDA-only ones (the benchmark on CUDA, the --amp
# deploys); it also ran under torch 2.11.0, the H200 image's version (STUDENTS=tiny): no error, the same accuracies.
# DEVICES="cuda cpu" adds the same commands on that machine's CPU.
set -u
export PYTHONUNBUFFERED=1 L2O_KD_CACHE=${L2O_KD_CACHE:-/tmp/l2o_cache} PYTHONPATH=$PWD
DATA=${DATA:-.devcarry/cifar10-jpeg.tar.gz}
OUT=${OUT:-/tmp/out}
DEVICES=${DEVICES:-cuda}
STUDENTS=${STUDENTS:-tiny resnet8}
LIMIT=${LIMIT:-150}
DEADLINE=${DEADLINE:-500}
mkdir -p $OUT
rm -rf /tmp/runs  # fresh runs, not resumed ones
log() { tee -a $OUT/timing.txt; }
run() {  # run LIMIT CMD...: CMD's stdout; its stderr to $OUT/stderr.txt; "(skipped|exit N ...)" when it did not end well
  local left=$((DEADLINE - SECONDS)) limit=$1; shift
  [ $left -lt $limit ] && limit=$left
  if [ $limit -le 0 ]; then echo "(skipped: past the ${DEADLINE}s deadline: $*)"; return; fi
  echo "== $*" >> $OUT/stderr.txt
  timeout -k 10 $limit "$@" 2>> $OUT/stderr.txt || echo "(exit $? after at most ${limit}s: $*)"
}
{ date; nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'threads', torch.get_num_threads())"; } | log
case " $DEVICES " in *" cuda "*)
  run $((2 * LIMIT)) python3 scripts/bench_operators.py --device cuda --students tiny,small,resnet8 | log ;;
esac
for dev in $DEVICES; do
  amps="fp32"; [ $dev = cuda ] && amps="fp32 amp"
  for student in $STUDENTS; do
    for name in adam operator; do
      for amp in $amps; do
        flags="--operator adam --lr 0.0095 --schedule cosine --beta 0.5 --temperature 4"  # the tuned Adam of the README
        [ $name = operator ] && flags="--optimizer checkpoints/operator.pt"
        [ $amp = amp ] && flags="$flags --amp"
        tag=$dev-$student-$name-$amp
        run $LIMIT python3 -m l2o_kd deploy --student $student $flags --epochs 1 --data-root $DATA --device $dev \
          --runs-dir /tmp/runs --run-name epoch-$tag --no-progress | tail -1 | sed "s/^/deploy $tag (one epoch; wall_s: its training steps alone): /" | log
        sed "s/^{/{\"run\": \"$tag\", /" /tmp/runs/epoch-$tag/metrics.jsonl >> $OUT/metrics.jsonl 2>/dev/null
      done
    done
    start=$SECONDS
    result=$(run $LIMIT python3 -m l2o_kd meta-train --method es --es-params mix-schedule --init checkpoints/operator.pt \
      --students $student --val-students $student --curriculum 200 --meta-steps 2 --pairs 1 --validate-every 1000 \
      --val-horizon 10 --val-seeds 1000 --data-root $DATA --device $dev --runs-dir /tmp/runs --run-name meta-$dev-$student \
      --out /tmp/runs/meta-$dev-$student.pt --no-progress | tail -1)
    echo "meta-train $dev $student (2 ES meta-steps: 800 student steps, 2 end-of-episode evals each; two 10-step meta-validations; wall_s: all of it): $result" | log
    case $result in "("*) ;; *) echo "meta-train $dev $student: $((SECONDS - start)) s wall, process start included" | log ;; esac
  done
done
