"""The containerd backend: its gRPC API for names and presence, its content directory for bytes."""
