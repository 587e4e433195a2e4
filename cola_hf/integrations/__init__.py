"""Optional at run time: W&B tracking and the Hub. Without network a run still completes."""
