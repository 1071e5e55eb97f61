"""Feature definitions (definitions.py) and their offline computation (offline.py)."""
