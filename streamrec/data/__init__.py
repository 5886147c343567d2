"""Data: canonical schema, synthetic world, MovieLens loaders, data contract, storage."""
