"""Monitoring: serving metrics, the sampled request/impression log, skew and drift checks, health alerts."""
