"""StreamRec: a multi-stage recommender (retrieval -> DCN-V2 ranking -> re-ranking).

The library is plain Python: every stage runs in-process. Ray Serve wrappers live in
``deployments/``; Feast definitions in ``feature_repo/``; training jobs in ``training/``.
"""

__version__ = "0.1.0"
