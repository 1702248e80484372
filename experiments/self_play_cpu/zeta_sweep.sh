#!/usr/bin/env bash
# The zeta sweep of experiments/self_play_cpu (README.md): a real Hydra multirun (basic launcher), one job per zeta,
# at the scale the shared 2-core machine allowed in the time left (4 dialogues x 2 turns, 6 DPO steps per model,
# 16 held-out MT-Bench questions x 32 tokens).
#   bash experiments/self_play_cpu/zeta_sweep.sh /work/runs/zeta_sweep
#   python experiments/self_play_cpu/table.py --sweep /work/runs/zeta_sweep
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on a shared 2-core machine two torch threads per run spin-wait
out=$1
here=$(cd "$(dirname "$0")/../.." && pwd)
python -m expertchat -m rounds=1 topics.n=4 dialogue.turns=2 training.steps=6 training.learning_rate=5e-4 \
  training.beta=0.1 evaluation.source=jsonl "evaluation.path=$here/tests/data/mt_bench_questions.jsonl" \
  evaluation.limit=16 evaluation.max_new_tokens=32 reward.zeta=0.0,0.4,1.0 hydra.sweep.dir="$out"
