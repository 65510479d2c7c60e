//! Worker agent (H4).
