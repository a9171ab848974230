"""chatsft: fine-tune causal language models into chat models on multi-turn conversations."""

__version__ = "0.1.0"
