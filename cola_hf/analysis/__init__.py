"""What a model gets wrong, from a run's predictions: the analysis, the tutorial's reports, comparisons, tests."""
