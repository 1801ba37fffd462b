"""The keypoint network, its model file and geometry, and accuracy metrics."""
