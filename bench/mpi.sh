#!/usr/bin/env bash
# Data-parallel scaling on one machine:  bench/mpi.sh   (needs a `--features mpi` release build
# and Open MPI's mpirun; see README "Several processes, several machines").
#
# SmolLM2-135M-Instruct (the HF directory at MODEL), full fine-tuning by `rlhf sft` on IMDb
# sentences (ASSETS: sentiment-sentences), per_device_train_batch_size 4, 16 examples per step:
#   1x1  one process, one thread,   gradient_accumulation_steps 4
#   2x1  mpirun -np 2, one thread each, gradient_accumulation_steps 2 (the same global batch)
#   1x2  one process, two threads,  gradient_accumulation_steps 4 (what the cores give without MPI)
# run INTERLEAVED (1x1, 2x1, 1x2, 1x1, ...: PAIRS rounds). Each run takes STEPS steps; the first
# is not timed. Step time = median of the gaps between the logged steps' wall-clock times;
# tokens/s = the step's tokens / step time; all-reduce = the median of time/all_reduce (rank 0's
# wait in the gradient sum, which includes waiting for the slower rank). Prints one line per run
# and the medians of the per-round ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${BIN:-target/release/rlhf}"
MODEL="${MODEL:-target/bench/smollm2-instruct}"
ASSETS="${ASSETS:-$HOME/.cache/rlhf-assets}"
PAIRS="${PAIRS:-3}"
STEPS="${STEPS:-6}"
OUT="${BENCH_OUT:-target/bench/mpi}"
mkdir -p "$OUT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
lscpu | grep -E "Model name|^CPU\(s\)" | sed 's/  */ /g'
python3 - "$ASSETS/sentiment-sentences/imdb.json" "$OUT/sft.jsonl" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r["text"].strip()]
with open(sys.argv[2], "w") as f:
    for r in rows:
        f.write(json.dumps({"prompt": "Write a one-sentence movie review.", "completion": " " + r["text"].strip()}) + "\n")
EOF
run() { # name ranks threads accumulation
  local name=$1 ranks=$2 threads=$3 acc=$4 dir="$OUT/$1"
  local args=(sft --overwrite --set "model=\"$MODEL\"" --set "train_file=\"$OUT/sft.jsonl\""
    --set "output_dir=\"$dir\"" --set max_steps="$STEPS" --set per_device_train_batch_size=4
    --set gradient_accumulation_steps="$acc" --set threads="$threads" --set save_steps=0
    --set logging_steps=1 --set learning_rate=1e-5)
  if [ "$ranks" = 1 ]; then "$BIN" "${args[@]}" >"$dir.log" 2>&1
  else mpirun -np "$ranks" --bind-to core "$BIN" "${args[@]}" >"$dir.log" 2>&1; fi
  python3 - "$dir/metrics.jsonl" "$name" <<'EOF'
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
gaps = [b["time"] - a["time"] for a, b in zip(m, m[1:])]
step = statistics.median(gaps)
tps = statistics.median(x["tokens_per_second"] for x in m[1:])
ar = [x["time/all_reduce"] for x in m[1:] if "time/all_reduce" in x]
share = f" all-reduce {statistics.median(ar):.3f} s ({100 * statistics.median(ar) / step:.1f}% of the step)" if ar else ""
print(json.dumps({"run": sys.argv[2], "step_s": step, "tokens_per_s": tps, "all_reduce_s": statistics.median(ar) if ar else 0.0}))
print(f"{sys.argv[2]}: step {step:.2f} s, {tps:.0f} tokens/s{share}", file=sys.stderr)
EOF
}
: >"$OUT/results.jsonl"
for p in $(seq "$PAIRS"); do
  run 1x1 1 1 4 >>"$OUT/results.jsonl"
  run 2x1 2 1 2 >>"$OUT/results.jsonl"
  run 1x2 1 2 4 >>"$OUT/results.jsonl"
done
python3 - "$OUT/results.jsonl" "$PAIRS" <<'EOF'
import json, statistics, sys
r = [json.loads(l) for l in open(sys.argv[1])]
rounds = [r[i:i + 3] for i in range(0, len(r), 3)]
def med(f): return statistics.median(f(x) for x in rounds)
print(f"median over {len(rounds)} rounds: 2 ranks vs 1 process x 1 thread: {med(lambda x: x[0]['step_s'] / x[1]['step_s']):.2f}x speed-up; "
      f"vs 1 process x 2 threads: {med(lambda x: x[2]['step_s'] / x[1]['step_s']):.2f}x; "
      f"all-reduce share (2 ranks) {100 * med(lambda x: x[1]['all_reduce_s'] / x[1]['step_s']):.1f}%")
EOF
