#!/usr/bin/env bash
# rlhf vs PyTorch, side by side, in one command:  bench/run.sh
#
# Workloads (random-init models, f32, 2 threads on both sides):
#   train-smollm2     one training step, SmolLM2-135M architecture, batch 8 x 256 tokens
#   train-gpt2        one training step, GPT-2 small, batch 4 x 256
#   generate-smollm2  sampling, SmolLM2-135M, 16 prompts of 32 tokens (on average) x 64 new tokens
#   dpo-smollm2       one DPO step, SmolLM2-135M, 4 chosen + 4 rejected sequences of 256 tokens
#   train-smollm2-ckpt  train-smollm2 with gradient checkpointing on both sides
#   generate-smollm2-grpo  a GRPO-shaped rollout: 16 prompts x G = 8 samples x 256 new tokens
#                     (rlhf: each prompt prefilled once; PyTorch: num_return_sequences = 8)
#   *-lora-frozen16    the same with the frozen base stored in bf16 (rlhf --frozen-bf16; PyTorch
#                      loads the base in bf16 before PEFT wraps it, the usual PEFT set-up)
#   dpo-qwen05b-lora / dpo-qwen15b-lora  a LoRA DPO step (r 16 on all linear layers, PEFT on the
#                     PyTorch side), Qwen2.5-0.5B / -1.5B shapes, 4 + 4 x 512 tokens, gradient
#                     checkpointing on both sides (not in the default list: ~10 and ~25 minutes)
#                     (their GFLOP/s use the same 6 x N formula: with LoRA and recomputation a step
#                     is forward + recomputed forward + input-gradient backward, also ~6 x N)
#   *-bf16            the train and DPO workloads with bf16 mixed precision on both sides: rlhf's
#                     `bf16 = true` (bf16 matmuls where this CPU's measurement says they pay, else
#                     f32: the table's header says which) against PyTorch's bf16 autocast
# rlhf runs `rlhf bench` (src/commands/bench.rs), PyTorch runs bench/torch_bench.py. The two sides
# run INTERLEAVED in separate processes (rlhf, torch, rlhf, torch, ...: PAIRS pairs per workload),
# each process doing WARMUP untimed + REPEATS timed runs. The table shows medians over all timed
# runs of each side; the ratio is the median over pairs of (median rlhf / median torch in that
# pair), which cancels host slowdowns that last longer than one pair.
#
# The table's header names the CPU (lscpu's model name and the extensions rlhf dispatches on) and the
# path each rlhf kernel took on it; bench/RESULTS.md keeps one table per CPU model.
# FLOP counts (used for GFLOP/s):
#   N_mm  = parameters that take part in a matmul = layers x (attention + MLP projection weights)
#           + V x d for the LM head (tied or not); embedding lookups, norms and biases excluded.
#   train / dpo:  6 x N_mm x tokens  +  12 x layers x T^2 x d x sequences
#                 (forward 2 x N_mm per token and 4 x T^2 x d per layer and sequence for QK^T and
#                 PV over the full T x T score matrix; backward twice the forward)
#   generate:     2 x N_mm x new tokens  (prefill of the prompts and attention over the cache are
#                 not counted, so this understates the work done)
#
# Environment knobs:
#   PAIRS=3            interleaved (rlhf, torch) process pairs per workload
#   REPEATS            timed runs per process (after WARMUP=1 untimed); default 2, but 1 for
#                      train-smollm2 and dpo-smollm2, whose ~30-40 s rlhf steps would otherwise push
#                      the whole run past 20 minutes (3 pairs x 2 sides x 3 steps)
#   WORKLOADS="train-smollm2 train-smollm2-bf16 train-gpt2 train-gpt2-bf16 generate-smollm2 dpo-smollm2 dpo-smollm2-bf16"
#                      (any subset, any order)
#   REPEATS_<workload with - as _>  per-workload override, e.g. REPEATS_train_smollm2=2
#   BENCH_VENV=~/.cache/rlhf-bench-venv   the cached venv with torch + transformers from PyPI
#   QUIET_WAIT=600     seconds to wait for an idle machine before each process (0: don't check)
#   OTHER_MAX=0.2      a process whose timed runs shared the CPUs with other processes (more than
#                      this many cores on average, measured from /proc/stat inside each run) is run
#   RETRIES=2          again, at most RETRIES times; the table notes runs that stayed contaminated
#   BENCH_OUT=target/bench   where the raw JSON lines of each run are kept
# bench/run.sh --summarize target/bench/results-<time>.jsonl   prints the table of a finished run again.
# Results of one run on this machine, with a reading of them: bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PAIRS="${PAIRS:-3}"
REPEATS="${REPEATS:-}"
WARMUP="${WARMUP:-1}"
WORKLOADS="${WORKLOADS:-train-smollm2 train-smollm2-bf16 train-gpt2 train-gpt2-bf16 generate-smollm2 dpo-smollm2 dpo-smollm2-bf16}"
VENV="${BENCH_VENV:-$HOME/.cache/rlhf-bench-venv}"
QUIET_WAIT="${QUIET_WAIT:-600}"
OTHER_MAX="${OTHER_MAX:-0.2}"
RETRIES="${RETRIES:-2}"
OUT_DIR="${BENCH_OUT:-target/bench}"

log() { echo "[bench $(date +%H:%M:%S)] $*" >&2; }
start_all=$(date +%s)

# Prints the Markdown table (and per-run details) for a results file.
summarize() {  # RESULTS ELAPSED_S BUSY_WARNINGS
  "$PY" - "$1" "$2" "$3" "$OTHER_MAX" <<'PY'
import json, statistics, sys

path, elapsed, busy_warnings, other_max = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
ARCH = {  # layers, d, V, matmul weights per layer
    "smollm2": dict(L=30, d=576, V=49152, per_layer=576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536),
    "gpt2": dict(L=12, d=768, V=50257, per_layer=4 * 768 * 768 + 2 * 768 * 3072),
    "qwen2.5-0.5b": dict(L=24, d=896, V=151936, per_layer=2 * 896 * 896 + 2 * 896 * 128 + 3 * 896 * 4864),
    "qwen2.5-1.5b": dict(L=28, d=1536, V=151936, per_layer=2 * 1536 * 1536 + 2 * 1536 * 256 + 3 * 1536 * 8960),
}

def flops(r):
    a = ARCH[r["arch"]]
    n_mm = a["L"] * a["per_layer"] + a["V"] * a["d"]
    b, t = r["batch"], r["seq"]
    if r["workload"] == "generate":
        return 2 * n_mm * b * r.get("group", 1) * r["new_tokens"]
    seqs = b if r["workload"] == "train" else 2 * b
    return 6 * n_mm * seqs * t + 12 * a["L"] * t * t * a["d"] * seqs

runs = [json.loads(l) for l in open(path) if l.strip()]
names = list(dict.fromkeys(r["name"] for r in runs))
paths = sorted({r["result"].get("ops_path", "?") for r in runs if r["side"] == "rlhf"})
torch_v = sorted({r["result"].get("torch", "?") for r in runs if r["side"] == "torch"})
rl = [r["result"] for r in runs if r["side"] == "rlhf"]
print()
print(f"CPU: {rl[0].get('cpu', '?')} ({rl[0].get('cpu_flags', '?')})" if rl else "CPU: ?")
for k, v in (rl[0].get("kernels", {}) if rl else {}).items():
    print(f"  rlhf {k}: {v}")
bf16_runs = sorted({r.get("bf16_matmuls") for r in rl if r.get("bf16_requested")})
if bf16_runs:
    print(f"  rlhf bf16 = true gave bf16 matmuls: {', '.join(map(str, bf16_runs))}")
print(f"rlhf ops path: {', '.join(paths)}; PyTorch {', '.join(torch_v)}")
print()
print("| workload | rlhf s | PyTorch s | ratio (rlhf/torch, <1 is faster) | rlhf GFLOP/s | PyTorch GFLOP/s | peak RSS rlhf MB | peak RSS torch MB |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
details, gen_lines = [], []
for name in names:
    side = {s: [r for r in runs if r["name"] == name and r["side"] == s] for s in ("rlhf", "torch")}
    if not side["rlhf"] or not side["torch"]:
        continue
    times = {s: [t for r in side[s] for t in r["result"]["times_s"]] for s in side}
    med = {s: statistics.median(times[s]) for s in side}
    pairs = sorted({r["pair"] for r in side["rlhf"]} & {r["pair"] for r in side["torch"]})
    ratios = []
    for p in pairs:
        pr = [statistics.median(r["result"]["times_s"]) for r in side["rlhf"] if r["pair"] == p]
        pt = [statistics.median(r["result"]["times_s"]) for r in side["torch"] if r["pair"] == p]
        ratios.append(pr[0] / pt[0])
    ratio = statistics.median(ratios)
    r0 = side["rlhf"][0]["result"]
    gf = flops(r0) / med["rlhf"] / 1e9
    rss = {s: max(r["result"]["peak_rss_mb"] for r in side[s]) for s in side}
    shape = f'{r0["batch"]}x{r0["seq"]}' + (f'+{r0["new_tokens"]}' if r0["workload"] == "generate" else "")
    if r0.get("group", 1) > 1:
        shape = f'{r0["batch"]}x{r0.get("group")}x{r0["seq"]}+{r0["new_tokens"]}'
    if r0["workload"] == "dpo":
        shape = f'{r0["batch"]}+{r0["batch"]}x{r0["seq"]}'
    gf_torch = flops(r0) / med["torch"] / 1e9
    print(f"| {name} {shape} | {med['rlhf']:.2f} | {med['torch']:.2f} | {ratio:.2f} | {gf:.1f} | {gf_torch:.1f} | {rss['rlhf']:.0f} | {rss['torch']:.0f} |")
    if r0["workload"] == "generate":
        toks = r0["batch"] * r0.get("group", 1) * r0["new_tokens"]
        gen_lines.append(f"{name}: rlhf {toks / med['rlhf']:.1f} tokens/s, PyTorch {toks / med['torch']:.1f} tokens/s ({toks} new tokens per run)")
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
    other = {s: max((x for r in side[s] for x in r["result"].get("other_cpu", [])), default=0.0) for s in side}
    steal = {s: max((x for r in side[s] for x in r["result"].get("steal_cpu", [])), default=0.0) for s in side}
    retries = sum(r.get("retries", 0) for s in side for r in side[s])
    details.append(
        f"{name}: rlhf [{fmt(times['rlhf'])}] torch [{fmt(times['torch'])}] per-pair ratios [{fmt(ratios)}]; "
        f"max load from other processes rlhf {other['rlhf']:.2f} / torch {other['torch']:.2f} cores, "
        f"max steal {steal['rlhf']:.2f} / {steal['torch']:.2f}, re-runs {retries}"
        + (" -- CONTAMINATED: some timed run shared the CPUs" if max(other.values()) > other_max else "")
    )
print()
for l in gen_lines:
    print(l)
print()
print("Timed runs (s), in pair order:")
for l in details:
    print("  " + l)
print()
print((f"Total bench/run.sh time: {elapsed}s." if elapsed > 0 else "") + (f" WARNING: {busy_warnings} run(s) started on a busy machine." if busy_warnings else ""))
PY
}

PY="$VENV/bin/python"
[ -x "$PY" ] || PY=python3
if [ "${1:-}" = "--summarize" ]; then
  # bench/run.sh --summarize target/bench/results-….jsonl: the table again, from a finished run.
  summarize "${2:?usage: bench/run.sh --summarize RESULTS.jsonl}" 0 0
  exit 0
fi

# --- PyTorch environment (cached) -----------------------------------------------------------------
if ! "$VENV/bin/python" -c 'import torch, transformers' 2>/dev/null; then
  log "creating $VENV with torch + transformers from PyPI (a few minutes, once)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch transformers >&2
fi
PY="$VENV/bin/python"
log "$("$VENV/bin/python" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"

log "CPU: $(lscpu | sed -n 's/^Model name: *//p'); flags: $(grep -m1 -o -w -E 'avx2|fma|avx512f|avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"

# --- rlhf -----------------------------------------------------------------------------------------
log "cargo build --release"
cargo build --release >&2
RLHF=./target/release/rlhf

# --- helpers ----------------------------------------------------------------------------------------
# Busy share of all CPUs over one second, in percent, from /proc/stat.
cpu_busy() {
  local a b
  a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}

# Waits (up to QUIET_WAIT seconds) until other processes leave the CPUs idle: timings taken while
# something else runs are worthless on 2 cores.
wait_quiet() {
  [ "$QUIET_WAIT" -gt 0 ] || return 0
  local waited=0 busy
  while busy=$(cpu_busy); [ "$busy" -gt 15 ]; do
    if [ "$waited" -ge "$QUIET_WAIT" ]; then
      log "WARNING: machine still ${busy}% busy after ${QUIET_WAIT}s; timing anyway"
      BUSY_WARNINGS=$((BUSY_WARNINGS + 1))
      return 0
    fi
    if [ $((waited % 30)) -eq 0 ]; then
      log "machine ${busy}% busy ($(ps -eo pcpu=,comm= --sort=-pcpu | head -3 | awk '{printf "%s %s%%; ", $2, $1}')) - waiting"
    fi
    sleep 4; waited=$((waited + 5))
  done
}
BUSY_WARNINGS=0

workload_args() {
  case "$1" in
    train-smollm2)    echo "--workload train --arch smollm2 --batch 8 --seq 256" ;;
    train-gpt2)       echo "--workload train --arch gpt2 --batch 4 --seq 256" ;;
    generate-smollm2) echo "--workload generate --arch smollm2 --batch 16 --seq 32 --new-tokens 64" ;;
    generate-smollm2-grpo) echo "--workload generate --arch smollm2 --batch 16 --seq 32 --new-tokens 256 --group 8" ;;
    dpo-smollm2)      echo "--workload dpo --arch smollm2 --batch 4 --seq 256" ;;
    train-smollm2-ckpt) echo "--workload train --arch smollm2 --batch 8 --seq 256 --gradient-checkpointing" ;;
    dpo-qwen05b-lora) echo "--workload dpo --arch qwen2.5-0.5b --batch 4 --seq 512 --lora-r 16 --gradient-checkpointing" ;;
    dpo-qwen15b-lora) echo "--workload dpo --arch qwen2.5-1.5b --batch 4 --seq 512 --lora-r 16 --gradient-checkpointing" ;;
    *-frozen16)       echo "$(workload_args "${1%-frozen16}") --frozen-bf16" ;;
    *-bf16)           echo "$(workload_args "${1%-bf16}") --bf16" ;;
    *) echo "unknown workload '$1' (known: train-smollm2 train-gpt2 generate-smollm2 dpo-smollm2, the train/dpo ones with -bf16; train-smollm2-ckpt dpo-qwen05b-lora dpo-qwen15b-lora, the lora ones with -frozen16)" >&2; exit 2 ;;
  esac
}

mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/results-$(date +%Y%m%d-%H%M%S).jsonl"
: > "$RESULTS"

# Runs one side once; appends its JSON line, tagged with side, workload and pair, to $RESULTS.
run_side() {
  local side=$1 wl=$2 pair=$3 reps=$4 line args attempt=0 load
  args=$(workload_args "$wl")
  while :; do
    wait_quiet
    if [ "$side" = rlhf ]; then
      # shellcheck disable=SC2086
      line=$("$RLHF" bench $args --repeats "$reps" --warmup "$WARMUP" --seed "$pair")
    else
      # shellcheck disable=SC2086
      line=$("$VENV/bin/python" bench/torch_bench.py $args --repeats "$reps" --warmup "$WARMUP" --seed "$pair")
    fi
    load=$(printf '%s' "$line" | "$VENV/bin/python" -c \
      'import json, sys; print(max(json.load(sys.stdin)["other_cpu"], default=0))')
    if "$VENV/bin/python" -c 'import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))' "$load" "$OTHER_MAX" \
       && [ "$attempt" -lt "$RETRIES" ]; then
      attempt=$((attempt + 1))
      log "WARNING: $side $wl shared the CPUs with other processes (${load} cores); running it again ($attempt/$RETRIES)"
      continue
    fi
    break
  done
  echo "{\"side\":\"$side\",\"name\":\"$wl\",\"pair\":$pair,\"retries\":$attempt,\"result\":$line}" >> "$RESULTS"
}

for wl in $WORKLOADS; do
  workload_args "$wl" > /dev/null
  var="REPEATS_${wl//-/_}"
  case "$wl" in train-smollm2*|dpo-smollm2*|dpo-qwen*) default_reps=1 ;; *) default_reps=2 ;; esac
  reps="${!var:-${REPEATS:-$default_reps}}"
  for pair in $(seq "$PAIRS"); do
    log "$wl: pair $pair/$PAIRS (warm-up $WARMUP + $reps timed runs per process)"
    run_side rlhf "$wl" "$pair" "$reps"
    run_side torch "$wl" "$pair" "$reps"
  done
done

elapsed=$(( $(date +%s) - start_all ))
log "done in ${elapsed}s; raw results in $RESULTS"

# --- summary table ----------------------------------------------------------------------------------
summarize "$RESULTS" "$elapsed" "$BUSY_WARNINGS"
