"""Everything that imports Ray: the cluster, the inference executor, Ray Train, the job client."""
