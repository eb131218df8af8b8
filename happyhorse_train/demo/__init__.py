"""Everything the demo and the tests build locally: a random checkpoint and synthetic clips."""
