"""Benchmarks of the equicore engine (run as modules: ``python -m bench.defense_batching``)."""
