"""The typed schema of the Hydra config (the one home of every default): ``schema`` holds a dataclass per conf
group; its judging, hardware and model parts live beside it. ``from expertchat.config import X`` works for every
schema class."""

from expertchat.config.schema import *  # noqa: F401,F403 - the schema's public names
