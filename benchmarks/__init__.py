"""Benchmarks: `python -m benchmarks` measures engines and the HTTP service side by side."""
