//! End-to-end tests: ebpf.
