"""Benchmarks: rolebus against the raw nats-py baseline measured in the same run."""
