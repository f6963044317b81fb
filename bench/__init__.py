"""lazymount's benchmarks: run them with `python -m bench.run` from the repository root (see run.py)."""
