//! Fuzz target (placeholder).
