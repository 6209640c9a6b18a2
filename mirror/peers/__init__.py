"""Fetching content from other nodes of the cluster, authenticated with the cluster key."""
