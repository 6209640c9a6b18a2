"""Pointing a node's container runtime at its mirror, and taking it back.

`mirror configure containerd|containers|docker` edits the runtime's own configuration
(containerd's `hosts.toml` files, a `registries.conf.d` drop-in for containers/image,
dockerd's `daemon.json` and, where dockerd reads them, the `hosts.toml` files
of its `certs.d`) so pulls go to the mirror first; `mirror cleanup`
puts back exactly what was there before. Every file is written atomically and its original is
kept once, so an interrupted or repeated configure never loses the operator's configuration.
"""
