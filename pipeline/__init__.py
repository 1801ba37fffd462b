"""68-point facial landmarks over image archives on Ray; the packages are grouped by role
(docs/architecture.md)."""
