"""splitserve.v1 gRPC stubs, generated from inference.proto by ``make proto`` (never hand-edited)."""
