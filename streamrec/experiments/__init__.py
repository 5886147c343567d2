"""Experimentation: assignment, shadow scoring, analysis, rollout and the HTTP user simulator."""
