"""Run directories and the files in them: layout, checkpoint files, trust checks on foreign runs, strict JSON."""
