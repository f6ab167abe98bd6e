"""Speed benchmarks: `python -m bench` prints every target in one table."""
