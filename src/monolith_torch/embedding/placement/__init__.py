"""Where a factory's table rows live: one process, replicas, or row-wise shards."""
