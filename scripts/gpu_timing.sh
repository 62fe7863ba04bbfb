#!/usr/bin/env bash
# Prepared for a session with a GPU (the `device` tool), issue 15: on CUDA, the step-cost ratios of
# scripts/bench_operators.py, then for `tiny` and `resnet8` the wall time of one deploy epoch (tuned Adam and the
# shipped learned operator, fp32 and bf16 --amp) and of ES meta-training of the shipped operator (2 meta-steps of
# one antithetic pair of 200-step episodes: 800 student steps). Not yet run on a GPU (none was lent to the sessions
# that wrote it). Each command is cut at LIMIT seconds (the benchmark at twice that), so one that hangs leaves the
# others their time; everything lands in $OUT/timing.txt as it comes (each deploy's metrics rows in
# $OUT/metrics.jsonl, every command's stderr in $OUT/stderr.txt).
# Usage: here `mkdir -p .devcarry && cp ../shared/data/cifar10-jpeg.tar.gz .devcarry/` (ignored by git), then the device
# tool's run with carry [".devcarry"], timeout_s 560 (planned to take ~6 min on an H200) and the command
#   DATA=.devcarry/cifar10-jpeg.tar.gz OUT=$OUT bash scripts/gpu_timing.sh
# Its dry run also ran under torch 2.11.0 (the H200 image's version; STUDENTS=tiny): no error, the same accuracies.
# Dry run without a GPU (every command once, on this project's 2-core CPU; LIMIT=400, ~6 min):
#   DEVICES=cpu LIMIT=400 DATA=../shared/data/cifar10-jpeg.tar.gz bash scripts/gpu_timing.sh
# DEVICES="cuda cpu" adds the same commands on that machine's CPU.
set -u
export PYTHONUNBUFFERED=1 L2O_KD_CACHE=${L2O_KD_CACHE:-/tmp/l2o_cache} PYTHONPATH=$PWD
DATA=${DATA:-.devcarry/cifar10-jpeg.tar.gz}
OUT=${OUT:-/tmp/out}
DEVICES=${DEVICES:-cuda}
STUDENTS=${STUDENTS:-tiny resnet8}
LIMIT=${LIMIT:-150}
mkdir -p $OUT
rm -rf /tmp/runs  # fresh runs, not resumed ones
log() { tee -a $OUT/timing.txt; }
run() { limit=$1; shift; echo "== $*" >> $OUT/stderr.txt; timeout $limit "$@" 2>> $OUT/stderr.txt || echo "(exit $? after at most ${limit}s: $*)"; }
{ date; nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'threads', torch.get_num_threads())"; } | log
case " $DEVICES " in *" cuda "*)
  run $((2 * LIMIT)) python3 scripts/bench_operators.py --device cuda --students ${STUDENTS// /,},small | log ;;
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
    start=$(date +%s%N)
    run $LIMIT python3 -m l2o_kd meta-train --method es --es-params mix-schedule --init checkpoints/operator.pt --students $student \
      --val-students $student --curriculum 200 --meta-steps 2 --pairs 1 --validate-every 1000 --val-horizon 10 --val-seeds 1000 \
      --data-root $DATA --device $dev --runs-dir /tmp/runs --run-name meta-$dev-$student --out /tmp/runs/meta-$dev-$student.pt \
      --no-progress | tail -1 | sed "s/^/meta-train $dev $student: /" | log
    echo "meta-train $dev $student: 2 ES meta-steps (800 student steps + 2 end-of-episode evals per meta-step) and one 10-step validation: $(( ($(date +%s%N) - start) / 1000000 )) ms wall, process start included" | log
  done
done
