#!/usr/bin/env bash
# The small learning-rate / beta / steps search of experiments/self_play_cpu (README.md), one round each.
#   bash experiments/self_play_cpu/search.sh OUT NAME LR BETA STEPS [SEED_RUN]
# Every try shares the settings in COMMON. With SEED_RUN (an earlier try's folder), the try starts from that run's
# round-0 dialogues, ratings and base evaluation (the same seed and base models give the same ones) and runs only
# the training and the round-0 evaluation; resume=force records the changed training keys in resumes.jsonl.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on a shared 2-core machine two torch threads per run spin-wait
out=$1 name=$2 lr=$3 beta=$4 steps=$5 seed_run=${6:-}
here=$(cd "$(dirname "$0")/../.." && pwd)
COMMON=(rounds=1 topics.n=8 dialogue.turns=2 evaluation.source=jsonl
        "evaluation.path=$here/tests/data/mt_bench_questions.jsonl" evaluation.limit=40 evaluation.max_new_tokens=48)
dir=$out/$name
if [[ -n "$seed_run" && ! -e "$dir" ]]; then
  mkdir -p "$dir/stages"
  cp -r "$seed_run"/{config.yaml,topics.json,turns.jsonl,ratings.jsonl,dialogues,eval_prompts.json} "$dir/"
  cp "$seed_run"/stages/{base.evaluation.json,round_0.dialogue.json,round_0.rating.json} "$dir/stages/"
  grep '"round": "base"' "$seed_run/eval.jsonl" > "$dir/eval.jsonl"
  force=(resume=force)
else
  force=()
fi
python -m expertchat "${COMMON[@]}" training.learning_rate="$lr" training.beta="$beta" training.steps="$steps" \
  "${force[@]}" hydra.run.dir="$dir"
