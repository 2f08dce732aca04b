"""Evaluation stage: lm-eval tasks through the Engine interface, and golden-prompt diffs."""
