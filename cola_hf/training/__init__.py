"""Training: the model, the Trainer subclass and what keeps a run alive (SIGTERM, the output-directory rule)."""
