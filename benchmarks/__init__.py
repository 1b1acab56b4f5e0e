"""Benchmarks: each ``bench_<name>.py`` has ``main(argv) -> int`` and writes ``results/benchmarks/<name>.md``."""
