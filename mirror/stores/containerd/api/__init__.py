"""Generated Python bindings for the subset of containerd's gRPC API that mirror uses.

The hand-written .proto files here declare only the fields mirror reads; field numbers match
containerd 1.6's API. Regenerate the *_pb2 modules with scripts/gen-protos.
"""
