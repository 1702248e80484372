"""Each role's policy: the LoRA adapters (or fully fine-tuned weights) on a base, the views every stage computes
with, merged copies for inference. Every PEFT internal stays in this package."""

# ``Policies(models, cfg)`` builds the class registered for ``cfg.method``: importing the package registers both.
from expertchat.policies import full, lora  # noqa: F401
