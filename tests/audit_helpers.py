"""Crafted audit rows shared by tests/test_audit.py and tests/report/test_audit.py: pairwise verdicts and
ratings whose statistics are known."""

from __future__ import annotations

import numpy as np


def verdict(p_x_first, p_x_second, x_tokens=10, y_tokens=10):
    return {"p_x_first": p_x_first, "p_x_second": p_x_second, "x_tokens": x_tokens, "y_tokens": y_tokens}


def rating(rater, author, pid, score, content=0, scores=None):
    return {"kind": "rating", "rater": rater, "author": author, "prompt_id": pid, "sample": 0, "content": content,
            "score": score, "scores": scores or {"c": score}}


def crafted_ratings(q_actor, q_judge, bias_actor=0.0, bias_judge=0.0, content=0):
    """Both raters score both authors' answers to 30 prompts: true quality q + the rater's self-bonus."""
    rng = np.random.default_rng(0)
    rows = []
    for pid in range(30):
        qa, qj = q_actor + rng.normal(0, 1), q_judge + rng.normal(0, 1)
        rows += [rating("actor", "actor", pid, qa + bias_actor, content), rating("actor", "judge", pid, qj, content),
                 rating("judge", "actor", pid, qa, content), rating("judge", "judge", pid, qj + bias_judge, content)]
    return rows
