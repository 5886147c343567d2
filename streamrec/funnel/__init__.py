"""The funnel's stages: retrieval -> merge -> rank -> re-rank over one bundle, and the stage interface.

Below both the service (``streamrec/service``, ``streamrec/serving``) and the training pipeline
(``streamrec/pipeline``): offline evaluation and serving run these same objects.
"""
