"""Ranking: the one definition of the ranker's input features, shared by training and serving."""
