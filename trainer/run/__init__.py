"""The run and its loop: the loop, its parts, the step, gradient caching, skip counters,
interrupts, tracking choreography."""
