"""Runnable benchmarks: `python -m benchmarks` lists them; results go in benchmarks/README.md."""
