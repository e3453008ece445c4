"""The parts of benchmarks/run.py: shapes and FLOPs, workers, host facts, the report."""
