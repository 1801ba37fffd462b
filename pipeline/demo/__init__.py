"""The synthetic face archive the demo and the tests use."""
