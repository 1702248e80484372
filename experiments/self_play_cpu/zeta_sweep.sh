#!/usr/bin/env bash
# The zeta sweep of experiments/self_play_cpu (README.md): a real Hydra multirun (basic launcher), one job per zeta.
#   bash experiments/self_play_cpu/zeta_sweep.sh /work/runs/zeta_sweep
#   python experiments/self_play_cpu/table.py --sweep /work/runs/zeta_sweep
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on a shared 2-core machine two torch threads per run spin-wait
out=$1
here=$(cd "$(dirname "$0")/../.." && pwd)
python -m expertchat -m rounds=1 topics.n=8 dialogue.turns=2 training.steps=16 training.learning_rate=5e-4 \
  training.beta=0.1 evaluation.source=jsonl "evaluation.path=$here/tests/data/mt_bench_questions.jsonl" \
  evaluation.limit=40 evaluation.max_new_tokens=48 progress=false reward.zeta=0.0,0.4,1.0 hydra.sweep.dir="$out"
