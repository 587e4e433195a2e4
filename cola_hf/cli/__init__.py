"""The command lines: cola-train (experiments/cola.py), cola-predict, cola-compare."""
