#!/usr/bin/env bash
# The GPU checks, as one prepared script for the lent device machine (see ../shared/notes/device.md):
# batched serving throughput (issue: serving) and DeepSpeed fp16 training throughput (issue: trainer), each
# against its plain diffusers baseline, on the random SD-1.5-sized model. Tables go to stdout, JSON, logs and the
# trainer's events (<part>.events.jsonl: every progress window, checkpoint and the `compiled` event) to $OUT, each as
# soon as its part ends, so a run cut short still returns what it measured. The compiling parts log torch's graph
# breaks and recompiles (TORCH_LOGS): profile-compile in its log, train-compile in <part>.torch.log (from the worker
# logs of the Ray session the part started; a part that started none gets no such file).
#
#   here:   ../shared/tools/device-bundle.sh .gpu && cp .venv/lib/python3*/site-packages/open_clip/bpe_simple_vocab_16e6.txt.gz .gpu/
#           echo /.gpu/ >> .git/info/exclude
#   device: run(command="bash bench/device_run.sh", carry=[".gpu"], timeout_s=600)
#
# Parts, in order of what the open targets need (what session 7 measured on an H100 comes last: bench/README.md),
# each started only while enough of the DEADLINE_S budget (default 570 s) is left; the bundle's install and the
# model build take ~1 min first (session 21: 61 s on a fresh H200 machine, 38 s, the install again, on a warm one):
#   profile-baseline  train_step_profile.py: the trainer's engine against the plain PyTorch step (diffusers'
#                  train_dreambooth.py's step: AdamW, fp16 autocast + GradScaler, no DeepSpeed) on the same inputs,
#                  compiled and eager alike (the compiled pair first: a cut at the deadline takes the eager pair,
#                  seconds each): the like-for-like figure the throughput target's "2x" needs (the engine's 73.9 ms
#                  on the H200 in session 21 had no baseline beside it)                              ~7 min
#   train-compile  train_throughput.py --compile: the baseline, then the trainer with torch_compile, which since
#                  session 21 replays CUDA graphs (cuda_graphs): Ray Train, checkpoints, the whole loop, against
#                  the profile's 73.9 ms a step (H200, session 21); ~2.5 min of compiling (session 17,
#                  without CUDA graphs, cut short at 382 s)                                         ~7 min
#   memory-compile train_step_profile.py, UNet + text encoder with gradient checkpointing, eager then compiled
#                  with CUDA graphs: full fine-tuning's speed, and the memory CUDA graphs add, against the 16 GiB
#                  target (the engine alone, no VAE nor validation: the whole trainer's eager peak, 15.37 GiB in
#                  session 17, is part train-memory's, not comparable)                              ~5 min
#   train-memory-compile  the trainer as part train-memory, compiled: full fine-tuning through Ray Train with
#                  CUDA graphs and a validation at the end, whose eager sampling cannot use the memory the
#                  graphs' pool keeps (the validation event's peak against the last progress event's)  ~6 min
#   profile        train_step_profile.py --profile: the trainer's eager step against its config before session
#                  17 (DeepSpeed's own clipping, 3 host syncs per optimizer group): where the eager step's
#                  time goes (H200, session 21: 145.7 against 182.0 ms, 2 against 53 host syncs a step) ~2 min
#   serve          serve_throughput.py, 1 (10 requests) and 16 clients and Poisson arrivals: engine with
#                  whole batches, with step-level batching, and step-level with its UNet compiled (serving's
#                  compile_unet), and the pipeline baseline at 16 clients only (48 requests, ~1 min): the 3x
#                  target's 4.5x and 6.4x (H100, session 3) were measured when the model sampled with DDPM, before
#                  session 16's PNDM, so the ratio is measured again                                  ~6.5 min
#   profile-compile  train_step_profile.py, the trainer's torch_compile (CUDA graphs) and compiled without
#                  them, phase by phase (H200, session 21: 73.9 and 146.4 ms a step, peaks 18.08 and
#                  16.62 GiB; warm-ups 146 and 195 s; TORCH_LOGS perf_hints says why CUDA graphs were
#                  skipped, if they were: each variant's line counts them)                           ~7 min
#   profile-groups train_step_profile.py, the trainer's torch_compile against the same with optimizer groups
#                  of 256M: DeepSpeed's optimizer step (28 of the 74 ms on the H200) group by group, the
#                  compiled step's next lever, against the larger fp32 copy of one group's gradients  ~7 min
#   train          train_throughput.py (baseline + the trainer: flat parameters, eager)            ~4 min
#   memory         train_step_profile.py, UNet + text encoder: the trainer's memory with and
#                  without gradient checkpointing, and before its optimizer groups                   ~2 min
#   train-memory   the trainer training the text encoder too, with gradient checkpointing and
#                  a validation at the end (its peak counts; measured in session 17: 15.37 GiB)       ~3 min
# `ONLY=serve,profile` runs the parts named; SERVE_ARGS replaces the serve part's `--baseline-clients 16 --clients
# 1,16 --compile`. A part starts only if its estimate is left; a part cut anyway keeps its finished rows (serve writes
# its JSON row by row, the train parts print each side's row as it ends, train_step_profile.py each variant's line,
# and at the deadline's INT the table of the variants that ended).
# All of it is ~56 min, more than one call (570 s) or one session's device time (15 min, the machine's start
# included). Within 15 min, what the throughput target needs next: `ONLY=profile-baseline DEADLINE_S=540 bash
# bench/device_run.sh`, then at once (the machine goes back after 30 s idle) `ONLY=memory-compile
# DEADLINE_S=<status's budget_left_s less ~40 s>`; train-compile (the whole job, compiled) in a session of its own.
# Give each call timeout_s = DEADLINE_S + 30: the tool cuts a call at the budget left, and a part cut that way loses
# its row (one cut by DEADLINE_S prints what its events hold).
# Session 21 spent 490 s of device time on its first call (DEADLINE_S=540, 459 s of it running) and 126 s on its
# second (warm). A command run outside this script must print before the tool's limit: session 21's third call,
# `timeout --signal=INT 215` with the install in front and its output piped through `tail`, was cut by the tool at
# 245 s and returned nothing.
# Also worth a look on a GPU (session 20, from reading torch's source, not measured): the async checkpoint's pinned
# host buffers come from torch's caching host allocator, which rounds each up to a power of two (an 11.2 GiB
# ZeRO-2 checkpoint would pin ~15.2 GiB).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$SECONDS
deadline=${DEADLINE_S:-570}
only=${ONLY:-all}
# Checked before the install (a minute of device time): a misspelt part in ONLY ran nothing, without a word.
parts=" profile-baseline train-compile memory-compile train-memory-compile profile serve profile-compile profile-groups \
train memory train-memory "
for name in ${only//,/ }; do
  if [ "$name" != all ] && [[ "$parts" != *" $name "* ]]; then
    echo "ONLY: no part $name; the parts:$parts" >&2
    exit 2
  fi
done
bash .gpu/install.sh || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
vocab=(--clip-bpe .gpu/bpe_simple_vocab_16e6.txt.gz)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /tmp | tail -1
scratch=${TMPDIR:-/tmp}

# part NAME NEEDED_S COMMAND...: runs COMMAND (output to $OUT/NAME.log) if NEEDED_S are left, cut at the deadline.
# A train part's scratch is $scratch/bench-train-NAME (its --work-dir): emptied before, its events kept after.
part() {
  local name=$1 needed=$2
  shift 2
  [ "$only" = all ] || [[ ",$only," == *",$name,"* ]] || return 0
  local left=$((deadline - (SECONDS - start)))
  if [ "$left" -lt "$needed" ]; then
    echo "== $name: skipped, ${left} s left of the budget, ${needed} s needed"
    return 0
  fi
  local work=$scratch/bench-train-$name
  rm -rf "$work"  # what a call cut short on this (warm) machine left: the trainer would resume from it
  local ray_session
  ray_session=$(readlink /tmp/ray/session_latest)
  echo "== $name ($((SECONDS - start)) s in, up to ${left} s)"
  timeout --signal=INT --kill-after=10 "$left" "$@" 2>&1 | grep --line-buffered -v "it/s]" | tee "$OUT/$name.log" |
    grep --line-buffered -E "^(\||model|device|at |trainer|baseline|engine|compiled|torch\.compile|Row\(|- |peak|cut short|Traceback|[A-Za-z_.]*(Error|Exception)\b)|: step [0-9]|: failed$"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  # Torch's graph breaks and recompiles (TORCH_LOGS) in the trainer's Ray worker, whose output stays in Ray's logs:
  # of this part's Ray session only (a part that starts none leaves session_latest at an earlier part's or call's).
  if [ "$(readlink /tmp/ray/session_latest)" != "$ray_session" ]; then
    grep -h -E "Recompil|[Gg]raph break" /tmp/ray/session_latest/logs/worker-*.err > "$OUT/$name.torch.log" 2>/dev/null
    [ -s "$OUT/$name.torch.log" ] || rm -f "$OUT/$name.torch.log"
  fi
  # The trainer's events: every window, checkpoint and the compiled event. A part cut at the deadline (124: timeout's
  # INT, 137: its KILL) leaves ~22 GiB of ZeRO checkpoints beside them (a 64 GiB disk), and they hold what it measured
  # before it was cut, when the script had no time to say.
  local events=$work/storage/jobs/bench/events.jsonl
  if [ -f "$events" ]; then
    cp "$events" "$OUT/$name.events.jsonl"
    if [[ "$rc" == 124 || "$rc" == 137 ]] && ! grep -q "cut short" "$OUT/$name.log"; then
      python -c "import json, sys; from bench.train_throughput import read_events, summarise_events
print('trainer (killed):', json.dumps(summarise_events(read_events(sys.argv[1]), 5)))" "$events" | tee -a "$OUT/$name.log"
    fi
  fi
  rm -rf "$work"
}

export DREAMBOOTH_CLIP_BPE=$PWD/.gpu/bpe_simple_vocab_16e6.txt.gz
python -c "
import time; from dreambooth.tiny_model import build_random_sd15_model
t = time.time(); build_random_sd15_model('$HOME/.cache/dreambooth-cluster/models/sd15'); print(f'model built in {time.time() - t:.0f} s')
" || true

# The profiling parts compare with each other: the same warm-up (which goes on past it while fp16 skips steps) and steps.
profile_steps=(--steps 15 --warmup 5)
part profile-baseline 420 env TORCH_LOGS=perf_hints python bench/train_step_profile.py --model sd15 \
  --variants "plain PyTorch step + torch.compile,torch.compile,plain PyTorch step,trainer's config" \
  "${profile_steps[@]}" "${vocab[@]}"
part train-compile 420 env TORCH_LOGS=recompiles,graph_breaks,perf_hints python bench/train_throughput.py --model sd15 \
  --precision fp16 --compile "${vocab[@]}" --work-dir "$scratch/bench-train-train-compile" --out "$OUT/train_throughput_compiled.json"
part memory-compile 280 env TORCH_LOGS=perf_hints python bench/train_step_profile.py --model sd15 --train-text-encoder \
  --steps 5 --warmup 2 --variants "gradient checkpointing,torch.compile + gradient checkpointing" "${vocab[@]}"
part train-memory-compile 360 env TORCH_LOGS=perf_hints python bench/train_throughput.py --model sd15 --precision fp16 \
  --only trainer --compile --train-text-encoder --gradient-checkpointing --validation-prompt "a photo of sks dog in the snow" \
  "${vocab[@]}" --work-dir "$scratch/bench-train-train-memory-compile" --out "$OUT/train_throughput_memory_compile.json"
part profile 120 python bench/train_step_profile.py --model sd15 --profile --variants "trainer's config,before: DeepSpeed's clipping syncs + reduce_scatter" \
  "${profile_steps[@]}" "${vocab[@]}"
# shellcheck disable=SC2086
part serve 390 python bench/serve_throughput.py --model sd15 --requests-per-client 3 \
  ${SERVE_ARGS:---baseline-clients 16 --clients 1,16 --compile} \
  "${vocab[@]}" --out "$OUT/serve_throughput.json"
part profile-compile 420 env TORCH_LOGS=recompiles,graph_breaks,perf_hints python bench/train_step_profile.py --model sd15 \
  --variants "torch.compile,torch.compile without CUDA graphs" "${profile_steps[@]}" "${vocab[@]}"
part profile-groups 420 env TORCH_LOGS=perf_hints python bench/train_step_profile.py --model sd15 \
  --variants "torch.compile,torch.compile with optimizer groups of 256M" "${profile_steps[@]}" "${vocab[@]}"
part train 240 python bench/train_throughput.py --model sd15 --precision fp16 "${vocab[@]}" \
  --work-dir "$scratch/bench-train-train" --out "$OUT/train_throughput.json"
part memory 120 python bench/train_step_profile.py --model sd15 --train-text-encoder --steps 5 --warmup 2 \
  --variants "trainer's config,gradient checkpointing,before: whole blocks in one optimizer group + 5e8 buckets" \
  "${vocab[@]}"
part train-memory 180 python bench/train_throughput.py --model sd15 --precision fp16 --only trainer \
  --train-text-encoder --gradient-checkpointing --validation-prompt "a photo of sks dog in the snow" "${vocab[@]}" \
  --work-dir "$scratch/bench-train-train-memory" --out "$OUT/train_throughput_memory.json"
echo "== done after $((SECONDS - start)) s"
