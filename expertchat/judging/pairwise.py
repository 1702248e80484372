"""Pairwise verdicts: a judge model says which of two answers to the same question is better, asked in BOTH orders.

The judge reads ``[system, user: the question, answer A, answer B, the instruction]`` in its own chat template, its
reply forced to start with ``evaluation.pairwise.verdict_prefix`` (``Verdict: [[``), and the verdict is read from
its next-token probabilities of the two choice letters, renormalized over the two: never a parse failure. Asking
both orders, (x, y) and (y, x), and counting a verdict only when both orders agree is MT-Bench's defence against
position bias (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", section 3.3:
"inconsistent verdicts count as ties"); how often the orders agree is the judge's *position consistency*.

Cost: one forward pass per (pair, order), in batches of ``judging.batch_size`` sharing the template's head in the
KV cache (:class:`~expertchat.engine.kvcache.PrefixBatch`); only the last position's logits are kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from expertchat.engine.kvcache import PrefixBatch
from expertchat.engine.models import chat_messages
from expertchat.errors import ExpertChatError
from expertchat.report.console import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

    from expertchat.config.evaluation import PairwiseConfig
    from expertchat.engine.models import LoadedModel

TIE = 0.5  # the outcome of an inconsistent (or exactly even) pair: half a win


@dataclass(frozen=True)
class PairVerdict:
    """The judge's verdict on answers x and y to one question, asked in both orders.

    Attributes:
        p_x_first: P(x is better) with x shown as A (the first answer), renormalized over the two letters.
        p_x_second: P(x is better) with x shown as B (the second answer).
    """

    p_x_first: float
    p_x_second: float

    @property
    def prefers_first(self) -> tuple[bool | None, bool | None]:
        """Per order, whether the judge chose the answer shown first (``None``: exactly even)."""
        return (None if self.p_x_first == 0.5 else self.p_x_first > 0.5,
                None if self.p_x_second == 0.5 else self.p_x_second < 0.5)

    @property
    def consistent(self) -> bool:
        """Both orders chose the same answer (x in both, or y in both)."""
        return (self.p_x_first - 0.5) * (self.p_x_second - 0.5) > 0

    @property
    def outcome(self) -> float:
        """x's result: 1.0 (x better in both orders), 0.0 (y better in both), :data:`TIE` (the orders disagree)."""
        if not self.consistent:
            return TIE
        return 1.0 if self.p_x_first > 0.5 else 0.0

    @property
    def p_x(self) -> float:
        """P(x is better), the two orders averaged (the position-debiased probability)."""
        return (self.p_x_first + self.p_x_second) / 2


def choice_token_ids(tokenizer: PreTrainedTokenizerBase, prefix: str, choices: list[str]) -> list[int]:
    """The token each choice letter begins with when written right after ``prefix`` (so ``"A"`` after ``"[["``
    is the token the judge would emit there, whatever the tokenizer does with spaces and merges).

    Raises:
        ExpertChatError: a letter merges with the end of ``prefix`` into one token, or two letters begin with the
            same token (the verdict could not be told apart).
    """
    base = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = []
    for c in choices:
        both = tokenizer(prefix + c, add_special_tokens=False)["input_ids"]
        if both[:len(base)] != base or len(both) == len(base):
            raise ExpertChatError(f"evaluation.pairwise: the choice {c!r} merges with the end of the verdict prefix "
                                  f"{prefix!r} in this tokenizer; change evaluation.pairwise.verdict_prefix")
        ids.append(both[len(base)])
    if len(set(ids)) < len(ids):
        raise ExpertChatError(f"evaluation.pairwise.choices {list(choices)} begin with the same token in this "
                              f"tokenizer; use single letters such as [A,B]")
    return ids


class PairwiseJudge:
    """A judge model that compares two answers to the same question (:class:`PairVerdict`).

    Args:
        lm: the judge model and tokenizer (a PEFT-wrapped policy works: only its forward is called).
        cfg: ``evaluation.pairwise``: the system prompt, the comparison prompt, the verdict prefix, the letters.
        batch_size: (pair, order) prompts per forward pass.
        max_answer_tokens: a longer answer keeps its first and last halves (as the pointwise judge does).
    """

    def __init__(self, lm: LoadedModel, cfg: PairwiseConfig, batch_size: int = 16, max_answer_tokens: int = 384
                 ) -> None:
        self.lm, self.cfg, self.batch_size, self.max_answer_tokens = lm, cfg, batch_size, max_answer_tokens
        self.letters = choice_token_ids(lm.tokenizer, cfg.verdict_prefix, list(cfg.choices))

    def _cut(self, answer: str) -> str:
        tok, n = self.lm.tokenizer, self.max_answer_tokens
        ids = tok(answer.strip(), add_special_tokens=False)["input_ids"]
        if len(ids) <= n:
            return answer.strip()
        return tok.decode(ids[:n - n // 2]) + " ... " + tok.decode(ids[len(ids) - n // 2:])

    def render(self, question: str, answer_a: str, answer_b: str) -> list[int]:
        """The token ids of one comparison, up to and including the forced verdict prefix."""
        tok = self.lm.tokenizer
        user = self.cfg.prompt.format(question=question.strip(), answer_a=self._cut(answer_a),
                                      answer_b=self._cut(answer_b))
        messages = chat_messages(self.cfg.system, [(False, user)], tok.chat_template)
        if tok.chat_template:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model without a chat template: plain text
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
        return tok(text + self.cfg.verdict_prefix, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def p_first(self, prompts: list[list[int]], progress: bool = False, desc: str = "pairwise") -> list[float]:
        """P(the first answer is better) for each rendered comparison (``[N]`` floats in [0, 1])."""
        out: list[float | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        with progress_bar(len(prompts), progress, desc, unit="comparison") as bar:
            for lo in range(0, len(order), self.batch_size):
                chunk = order[lo:lo + self.batch_size]
                rows = [prompts[i] for i in chunk]
                shared = len(os.path.commonprefix(rows)) if len(rows) > 1 else 0
                logits = PrefixBatch(self.lm, rows, shared=shared).tail_logits[:, -1].float()
                two = logits[:, self.letters].softmax(-1)  # renormalized over the two letters
                for r, i in enumerate(chunk):
                    out[i] = float(two[r, 0])
                bar.update(len(chunk))
        return out  # type: ignore[return-value]

    def compare(self, items: list[tuple[str, str, str]], progress: bool = False, desc: str = "pairwise"
                ) -> list[PairVerdict]:
        """Verdicts on ``(question, x, y)`` triples, each asked as (x, y) and as (y, x)."""
        prompts = [p for q, x, y in items for p in (self.render(q, x, y), self.render(q, y, x))]
        p = self.p_first(prompts, progress, desc)
        return [PairVerdict(p_x_first=p[2 * k], p_x_second=1.0 - p[2 * k + 1]) for k in range(len(items))]
