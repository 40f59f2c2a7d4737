"""fulltune: full fine-tuning of pre-trained causal language models."""

import logging
import warnings


def _quiet_known_noise() -> None:
    """torchao (imported by transformers and by the low-bit optimisers) logs that its CUDA-only kernel
    libraries fail to load on a CPU machine, and torch logs an Enum deprecation for torchao's types at
    import: neither says anything about a fulltune run, so those two messages are dropped."""
    noise = ("Failed to load", "register_constant() on Enum subclasses")

    def keep(record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in noise)

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addFilter(keep)
    # torch.compile's cache notes that torchao's state tensors have no stable hash (it just does not cache them).
    warnings.filterwarnings("ignore", message=r".*does not implement _stable_hash_for_caching")


_quiet_known_noise()
__version__ = "0.1.0"
