"""Judging: the judge's prompts, its pure score maths, the judge's signals, the ``Judge`` and the rewards built on
its verdicts."""
