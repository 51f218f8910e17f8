"""Experiment-tracker back ends (MLflow, Weights & Biases, TensorBoard).

Each module imports its library only in `Tracker.start`, so `import segkit` stays fast and a
missing or broken back end only costs that tracker (see `segkit.trackers.base.Trackers`).
"""
