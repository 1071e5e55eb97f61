"""Monitoring: the closed retraining loop (`fraud.monitoring.retrain`) and PromQL helpers
(`fraud.monitoring.promql`) used to keep dashboards and alerts honest."""
