"""A user's config directory layered over the config tree segkit ships (search_path.py)."""
