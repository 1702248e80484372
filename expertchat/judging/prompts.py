"""The judge's prompts, tokenized in parts so that one encoding of a rated turn serves every rubric category.

A judge prompt is the chat rendering (the judge's own template) of ``[system, user: prompt(context, answer) +
instruction]`` with the assistant reply started by a forced prefix (``Rating: [[`` or the WIM prefix). It is
rendered once with sentinels in place of the context, the answer and the instruction, and cut there: head +
context + middle + answer + after is the *prefix* of an item; each category's instruction (per phrasing) with
the rest of the rendering and the forced prefix is a *suffix* shared by every item. So is the ``turing`` signal's
forced-choice question, once per letter order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from expertchat.engine.models import chat_messages
from expertchat.errors import ExpertChatError
from expertchat.judging.scoring import choice_tokens, score_tokens

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

    from expertchat.config.schema import JudgingConfig

# Sentinels that split a rendered judge prompt: private-use characters, which no chat template strips (Llama 3's
# ``| trim`` strips whitespace, and control characters such as \x1e count as whitespace in Python).
_SPLIT = ("\ue000CTX\ue001", "\ue000ANS\ue001", "\ue000INS\ue001")


class JudgePrompts:
    """The judge's prompts, tokenized in parts so that one prefix serves every category.

    A judge prompt is the chat rendering of ``[system, user: prompt(context, answer) + instruction]`` with the
    assistant reply started by a forced prefix. The prefix part (up to the instruction) is tokenized as
    head + context + middle + answer + tail, so the answer's token span is known exactly; each instruction and
    the rest of the rendering form a suffix shared by every item.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: JudgingConfig) -> None:
        self.tok = tokenizer
        self.cfg = cfg
        user = cfg.prompt.format(context=_SPLIT[0], answer=_SPLIT[1]) + _SPLIT[2]
        messages = chat_messages(cfg.system, [(False, user)], tokenizer.chat_template)
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model without a chat template: plain text
            rendered = "\n\n".join(m["content"] for m in messages) + "\n\n"
        if any(rendered.count(s) != 1 for s in _SPLIT):
            raise ExpertChatError("judging.prompt: the judge's chat template dropped or repeated the context / "
                                  "answer / instruction; check judging.prompt and the model's chat_template")
        head, rest = rendered.split(_SPLIT[0])
        middle, rest = rest.split(_SPLIT[1])
        after, self.tail = rest.split(_SPLIT[2])
        self.head_ids, self.middle_ids, self.after_ids = (self._ids(head), self._ids(middle), self._ids(after))
        names = list(cfg.active())
        self.rating_suffixes = {  # (category, phrasing) -> suffix ids
            (name, j): self._ids(ins.format(category=name.replace("_", " "),
                                            description=cfg.rubric[name].description) + self.tail
                                 + cfg.rating_prefix)
            for name in names for j, ins in enumerate(cfg.instructions)
        }
        first = next(iter(self.rating_suffixes))
        ins0 = cfg.instructions[0].format(category=first[0].replace("_", " "),
                                          description=cfg.rubric[first[0]].description)
        self.scores = score_tokens(tokenizer, ins0 + self.tail + cfg.rating_prefix)
        self.wim_suffix = self._ids(cfg.wim_instruction + self.tail + cfg.wim_prefix)
        self.turing_suffixes, self.turing_choices = self._turing()

    def _turing(self) -> tuple[list[list[int]], tuple[tuple[int, ...], ...]]:
        """The ``turing`` question's suffix in each letter order (A = human expert, then A = AI), its reply forced
        to start with ``judging.turing.prefix`` less its trailing whitespace, and the tokens of the letters A and
        B after it (:func:`~expertchat.judging.scoring.choice_tokens`: with and without a leading space)."""
        t = self.cfg.turing
        texts = [t.question.format(a=a, b=b) + self.tail + t.prefix.rstrip()
                 for a, b in ((t.human, t.ai), (t.ai, t.human))]
        return [self._ids(text) for text in texts], choice_tokens(self.tok, texts[0], ("A", "B"))

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def context_ids(self, context: str) -> list[int]:
        ids = self._ids(context.strip())
        return ids[-self.cfg.max_context_tokens:]

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens, cut (:meth:`cut_answer`) to ``judging.max_answer_tokens``."""
        return self.cut_answer(self.all_answer_ids(answer))

    def all_answer_ids(self, answer: str) -> list[int]:
        return self._ids(answer.strip())

    def cut_answer(self, ids: list[int]) -> list[int]:
        """An answer longer than ``judging.max_answer_tokens`` keeps its first and its last half: the judge sees
        how it starts and how it ends (two answers that differ only in their endings are told apart)."""
        n = self.cfg.max_answer_tokens
        return ids if len(ids) <= n else ids[:n - n // 2] + ids[len(ids) - n // 2:]

    def prefix(self, context_ids: list[int], answer_ids: list[int]) -> tuple[list[int], int]:
        """Prefix token ids and where the answer starts in them."""
        start = len(self.head_ids) + len(context_ids) + len(self.middle_ids)
        return self.head_ids + context_ids + self.middle_ids + answer_ids + self.after_ids, start

    def parse_prompt(self, context: str, answer: str, category: str) -> str:
        """The full text prompt of parse mode for one category (the original's instruction)."""
        ins = self.cfg.parse.instruction.format(category=category.replace("_", " "),
                                                description=self.cfg.rubric[category].description)
        ids = (self.prefix(self.context_ids(context), self.answer_ids(answer))[0] + self._ids(ins + self.tail))
        return self.tok.decode(ids)

    def wim_prompt(self, context: str, answer: str) -> str:
        ids = self.prefix(self.context_ids(context), self.answer_ids(answer))[0] + self.wim_suffix
        return self.tok.decode(ids)
