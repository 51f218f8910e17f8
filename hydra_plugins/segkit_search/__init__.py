"""segkit's Hydra sweeper over current Optuna (the search itself lives in segkit/search.py)."""
