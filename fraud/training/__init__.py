"""Training: ingest validation, point-in-time datasets, models, evaluation and the serving bundle."""
