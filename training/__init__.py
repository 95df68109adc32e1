"""Training, evaluation and synthetic data for PathFLIP (reproduces the shipped weights)."""
