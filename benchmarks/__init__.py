"""Benchmark scripts (see README.md); run from the repository root: python -m benchmarks.<script>."""
