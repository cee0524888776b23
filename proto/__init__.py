"""Generated protobuf / gRPC stubs (a leaf: generated at build, never hand-edited)."""
