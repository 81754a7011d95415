"""The throughput benchmark (issue 7): `python -m bench.run` from the repository root; see bench/RESULTS.md."""
