"""moed daemon: CLI, model runtime, loaders, tokenizer and generation."""

__version__ = "0.1.0"
