"""Real-daemon test harness: registry, containerd nodes and synthetic OCI images.

Kept inside ``tests`` so the shipped ``mirror`` package never depends on it.
"""
