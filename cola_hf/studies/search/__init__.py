"""A search: an Optuna study over a W&B sweep file's space (worker.py is where it starts)."""
