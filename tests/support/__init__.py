"""What the tests share: files they build, servers they start, harnesses they drive."""
