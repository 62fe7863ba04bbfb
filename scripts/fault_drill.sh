#!/usr/bin/env bash
# Fault drill on real data (issue 6): kill -9 during deploy, meta-train and compare, then resume and
# compare with uninterrupted runs; bad checkpoints; NaN; a full disk; bad flags. Prints one table row
# per fault (markdown, also written to $OUT/faults.md). About 10 minutes on 2 CPU cores.
#
#   DATA=../shared/data/cifar10-jpeg.tar.gz OUT=results/fault-drill bash scripts/fault_drill.sh
set -u
DATA=${DATA:-../shared/data/cifar10-jpeg.tar.gz}
OUT=${OUT:-results/fault-drill}
L2O="python -m l2o_kd"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1  # one thread: results reproducible bit for bit
rm -rf "$OUT" && mkdir -p "$OUT"
TABLE="$OUT/faults.md"
echo "| fault | what happened | survived |" > "$TABLE"
echo "|---|---|---|" >> "$TABLE"
row() { echo "| $1 | $2 | $3 |" | tee -a "$TABLE"; }
last() { tail -n1 "$1/metrics.jsonl" | python -c "import json,sys; r=json.load(sys.stdin); print(r['step'], r.get('$2'))"; }

# kill -9 once the run folder holds at least $3 lines in $2, return the exit code
kill_after() {
  "${@:3}" > /dev/null 2>&1 &
  local pid=$! f=$1 n=$2
  while kill -0 $pid 2>/dev/null && [ "$(cat "$f" 2>/dev/null | wc -l)" -lt "$n" ]; do sleep 0.2; done
  kill -9 $pid 2>/dev/null; wait $pid; echo $?
}

# 1. deploy: kill -9 after 2 evaluations, resume, compare with an uninterrupted run
D=(deploy --student tiny --operator adam --lr 3e-3 --steps 1000 --eval-every 200 --data-root "$DATA" --runs-dir "$OUT/runs" --no-progress)
$L2O "${D[@]}" --run-name full > /dev/null
code=$(kill_after "$OUT/runs/cut/metrics.jsonl" 2 $L2O "${D[@]}" --run-name cut)
at=$(last "$OUT/runs/cut" test_acc)
$L2O "${D[@]}" --run-name cut --resume > /dev/null
a=$(last "$OUT/runs/full" test_loss); b=$(last "$OUT/runs/cut" test_loss)
rows=$(wc -l < "$OUT/runs/cut/metrics.jsonl")
row "deploy killed (kill -9, exit $code) at step ${at% *}, then --resume" "final (step, test loss): uninterrupted $a, resumed $b; $rows metrics rows (5 expected)" "$([ "$a" = "$b" ] && [ "$rows" = 5 ] && echo yes || echo NO)"

# 2. meta-train: kill -9 after its second checkpoint, resume, compare the operators
M=(meta-train --data-root "$DATA" --meta-steps 6 --unroll 5 --curriculum 50 --validate-every 2 --val-horizon 50 --val-seeds 1000 --runs-dir "$OUT/runs" --no-progress)
$L2O "${M[@]}" --run-name meta-full > /dev/null
code=$(kill_after "$OUT/runs/meta-cut/metrics.jsonl" 2 $L2O "${M[@]}" --run-name meta-cut)
$L2O "${M[@]}" --run-name meta-cut --resume > /dev/null
same=$(python - "$OUT/runs" <<'EOF'
import sys, torch
a, b = (torch.load(f"{sys.argv[1]}/{r}/meta_checkpoint.pt", weights_only=True) for r in ("meta-full", "meta-cut"))
print(max((a["weights"][k] - b["weights"][k]).abs().max().item() for k in a["weights"]), a["progress"]["meta_step"], b["progress"]["meta_step"])
EOF
)
row "meta-train killed (kill -9, exit $code) after meta-step 2, then --resume" "max weight difference, meta-steps (uninterrupted, resumed): $same" "$([ "${same%% *}" = 0.0 ] && echo yes || echo NO)"

# 3. compare: kill -9 during the second cell, rerun the same command
C=(compare --operators sgd,adam --seeds 1 --steps 400 --evals 4 --lr sgd=0.03 --lr adam=3e-3 --data-root "$DATA" --no-progress)
$L2O "${C[@]}" --out "$OUT/cmp-full" > /dev/null
code=$(kill_after "$OUT/cmp-cut/runs/adam-s0/metrics.jsonl" 2 $L2O "${C[@]}" --out "$OUT/cmp-cut")
$L2O "${C[@]}" --out "$OUT/cmp-cut" > /dev/null
a=$(grep '"final": true' "$OUT/cmp-full/results.jsonl" | python -c "import json,sys; print([round(json.loads(l)['test_loss'],6) for l in sys.stdin])")
b=$(grep '"final": true' "$OUT/cmp-cut/results.jsonl" | python -c "import json,sys; print([round(json.loads(l)['test_loss'],6) for l in sys.stdin])")
n=$(wc -l < "$OUT/cmp-cut/results.jsonl")
row "compare killed (kill -9, exit $code) in its second cell, rerun" "final test losses: uninterrupted $a, rerun $b; $n result rows (10 expected)" "$([ "$a" = "$b" ] && [ "$n" = 10 ] && echo yes || echo NO)"

# 4. bad checkpoints: truncated, corrupted, wrong kind, pickled code
CK="$OUT/runs/full/checkpoint.pt"
head -c 5000 "$CK" > "$OUT/truncated.pt"
python -c "b=bytearray(open('$CK','rb').read()); b[len(b)//2:len(b)//2+64]=bytes(64); open('$OUT/corrupted.pt','wb').write(b)"
python -c "
import torch
class P:
    def __reduce__(self): return (print, ('pwned',))
torch.save({'format': 'l2o-kd', 'x': P()}, '$OUT/pickled.pt')"
for f in truncated corrupted pickled; do
  msg=$($L2O evaluate "$OUT/$f.pt" --data-root "$DATA" 2>&1 >/dev/null); code=$?
  row "$f checkpoint given to evaluate" "exit $code: $msg" "$([ $code = 2 ] && [ "$(echo "$msg" | wc -l)" = 1 ] && echo yes || echo NO)"
done
msg=$($L2O deploy --optimizer "$CK" --steps 10 --data-root "$DATA" --runs-dir "$OUT/runs" --run-name wrongkind 2>&1 >/dev/null); code=$?
row "a student checkpoint given as --optimizer" "exit $code: $msg" "$([ $code = 2 ] && echo yes || echo NO)"
cp "$OUT/runs/full/checkpoint.pt" "$OUT/good.pt"
cp "$OUT/truncated.pt" "$OUT/runs/full/checkpoint.pt"
msg=$($L2O "${D[@]}" --run-name full --resume 2>&1 >/dev/null); code=$?
cp "$OUT/good.pt" "$OUT/runs/full/checkpoint.pt"
row "--resume from a truncated checkpoint" "exit $code: $msg" "$([ $code = 2 ] && echo yes || echo NO)"

# 5. NaN: a learning rate that blows up; the last good checkpoint stays
msg=$($L2O deploy --student tiny --operator sgd --lr 1e6 --steps 400 --eval-every 100 --data-root "$DATA" --runs-dir "$OUT/runs" --run-name nan --no-progress 2>&1 >/dev/null); code=$?
kept=$(python -c "import torch; print(torch.load('$OUT/runs/nan/checkpoint.pt', weights_only=True)['train_state']['step'])" 2>/dev/null || echo none)
row "SGD at lr 1e6 (loss becomes NaN)" "exit $code: $msg; checkpoint kept at step $kept" "$([ $code = 1 ] && echo yes || echo NO)"

# 6. disk full while checkpointing (files limited to 64 KiB with ulimit -f), then space again: a run
# killed after 2 evaluations (so at least one checkpoint is whole) is resumed on a full disk (--resume
# continues the same run only)
kill_after "$OUT/runs/disk/metrics.jsonl" 2 $L2O "${D[@]}" --run-name disk > /dev/null
before=$(md5sum < "$OUT/runs/disk/checkpoint.pt")
msg=$( (ulimit -f 64; $L2O "${D[@]}" --run-name disk --resume 2>&1 >/dev/null) ); code=$?
after=$(md5sum < "$OUT/runs/disk/checkpoint.pt")
$L2O "${D[@]}" --run-name disk --resume > /dev/null
row "disk full while writing the next checkpoint" "exit $code: $msg; old checkpoint $([ "$before" = "$after" ] && echo intact || echo CHANGED); rerun with space: step $(last "$OUT/runs/disk" test_acc | cut -d' ' -f1)" "$([ $code = 1 ] && [ "$before" = "$after" ] && echo yes || echo NO)"

# 7. bad flags: one line, exit 2, nothing written
for flags in "--student vgg" "--lr -1" "--beta 1.5" "--data-root /nonexistent" "--device cuda"; do
  msg=$($L2O deploy $flags --steps 5 --runs-dir "$OUT/flags" 2>&1 >/dev/null); code=$?
  row "deploy $flags" "exit $code: $msg" "$([ $code = 2 ] && [ "$(echo "$msg" | wc -l)" = 1 ] && [ ! -e "$OUT/flags" ] && echo yes || echo NO)"
done
