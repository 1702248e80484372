"""ExpertChat: two LLMs hold expert dialogues, rate each other, and improve by bidirectional online DPO."""

__version__ = "0.1.0"
