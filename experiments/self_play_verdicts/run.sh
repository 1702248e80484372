#!/usr/bin/env bash
# Does self-play work? experiments/self_play_verdicts (README.md): three rounds of bidirectional self-play per seed,
# then every point (base, rounds 0-2) evaluated on the 80 MT-Bench questions with pointwise rewards, pairwise
# verdicts in both orders and the judge audit.
#   bash experiments/self_play_verdicts/run.sh OUT SEED [CORE]
# Training and evaluation are two commands so that the evaluation can be changed and rerun on the same adapters
# (delete <run>/stages/*.evaluation.json, eval.jsonl, pairwise.jsonl and audit.jsonl first).
set -euo pipefail
out=$1 seed=$2 core=${3:-}
here=$(cd "$(dirname "$0")/../.." && pwd)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # two seeds side by side on a 2-core machine: one thread each
pin=()
[[ -n "$core" ]] && pin=(taskset -c "$core")
run=$out/seed$seed
"${pin[@]}" python -m expertchat rounds=3 seed="$seed" topics.n=8 dialogue.turns=2 training.steps=16 \
  training.learning_rate=5e-4 training.beta=0.1 evaluation.enabled=false progress=false hydra.run.dir="$run"
"${pin[@]}" python -m expertchat mode=eval evaluation.run="$run" evaluation.source=jsonl \
  evaluation.path="$here/tests/data/mt_bench_questions.jsonl" evaluation.max_new_tokens=64 progress=false
