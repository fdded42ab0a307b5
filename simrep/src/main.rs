//! The `simrep` command.
fn main() {}
