"""The Ray-free stages a unit of rows goes through: read, predict, commit."""
