"""Models: loading, the Trainer, inference."""
