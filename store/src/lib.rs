//! State store (H5).
