"""Online serving: the request funnel as plain Python stages (no Ray Serve imports here).

``deployments/`` wraps these stages in Ray Serve deployments; the same objects run in-process in
tests and in the fused composition.
"""
