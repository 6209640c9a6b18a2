"""Fetching from registries outside the cluster: the last resort after the node and its peers."""
