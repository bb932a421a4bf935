"""Training for Pyramidal Flow Matching: recipes, data, objective, loop, checkpoints (see training/launch.py)."""
