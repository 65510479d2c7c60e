//! gRPC API (H4).
