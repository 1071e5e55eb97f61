"""Monitoring: the closed retraining loop (`fraud.monitoring.retrain`)."""
