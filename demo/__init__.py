"""The platform demonstration: `python -m demo` (see __main__.py)."""
