"""splitserve gRPC API packages (generated stubs live in versioned subpackages)."""
