"""loralab: fine-tune open LLMs with LoRA, from a dataset to an evaluated, exported, served model."""
__version__ = "0.1.0"
