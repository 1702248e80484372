"""The stages of a round, each a function of the run context: topics, dialogue, rating, training (with the TRL
coupling in ``dpo``) and the held-out evaluation."""
