"""Candidate retrieval: sources (ANN, collaborative filtering, category affinity, trending) and merge.

Plain Python and numpy/scipy/FAISS over dense integer indices; no Ray. Each source implements
:class:`~streamrec.retrieval.base.RetrievalSource` (``retrieve(user, n) -> (items, scores)``).
"""
