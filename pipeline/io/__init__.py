"""Storage, shard listing and reading, output files, completion records, reports."""
