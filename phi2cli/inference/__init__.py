"""Inference: generation, fast decoding, evaluation and summarization use cases."""
