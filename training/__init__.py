"""Ray job entry points: ``python -m training.<job>`` locally or via ``ray job submit``."""
