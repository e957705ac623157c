"""Training: the engine, the specialised Trainer, the execution plan and multi-GPU launch."""
