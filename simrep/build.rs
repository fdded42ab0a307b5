//! Build script: builds the eBPF programs (placeholder until the eBPF chain lands).
fn main() {}
