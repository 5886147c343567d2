"""The serving service: arguments, loading, the degradation policy, stage runners, hot reload.

Plain Python with no Ray Serve imports; ``deployments/`` wraps it in Serve deployments.
"""
