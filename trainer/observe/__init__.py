"""What watches a run: the metrics window, the step clock, stragglers and the verdict, the
profiler, curves, host syncs."""
