"""tc-lite: memory-efficient TextCraftor — reward fine-tuning of the Stable Diffusion text encoder."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft) warns on every start, on CPUs with AVX512-BF16, that an optional 4-bit CPU kernel
# package is missing. tc-lite never uses 4-bit CPU matmuls; the line only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
