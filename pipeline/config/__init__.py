"""Option schemas (dataclass fields -> flags and config keys) and YAML job configs."""
