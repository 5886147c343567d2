"""The outer loop: features -> training sets -> models -> evaluation -> registry -> fallback.

Plain library code; ``training/`` holds the thin ``python -m training.<job>`` entry points.
"""
