"""phi2cli: QLoRA fine-tuning of microsoft/phi-2 for XSUM news summarization."""

__version__ = "0.1.0"
