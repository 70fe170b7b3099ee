"""Benchmarks of lazystream against the other offloaders (lazystream bench)."""
