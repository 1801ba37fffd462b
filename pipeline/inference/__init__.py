"""The inference job: its settings and its driver."""
