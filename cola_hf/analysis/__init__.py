"""Reads predictions and annotations, never a model: analyses, comparisons, reports."""
