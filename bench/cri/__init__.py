"""Generated gRPC API subset (see scripts/gen-protos)."""
