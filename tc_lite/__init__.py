"""tc-lite: memory-efficient TextCraftor — reward fine-tuning of the Stable Diffusion text encoder."""

__version__ = "0.1.0"
