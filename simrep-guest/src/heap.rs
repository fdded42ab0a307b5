//! The workload heap (`abi::HEAP_GPA..mem_size`), handed out in big pieces
//! that live as long as the guest: network rings, the kv arena, bank
//! accounts. A bump allocator; each service manages the inside of its
//! pieces itself.

use crate::abi::{self, BootParams};

/// Bump allocator over the heap.
pub struct Heap {
    next: u64,
    end: u64,
}

impl Heap {
    /// The whole heap of this guest.
    pub fn new(bp: &BootParams) -> Self {
        Heap {
            next: abi::HEAP_GPA,
            end: bp.mem_size.max(abi::HEAP_GPA),
        }
    }

    /// `size` bytes aligned to `align` (a power of two), or `None` when
    /// the heap is exhausted.
    pub fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let start = self.next.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(start)
    }

    /// Bytes left (before alignment).
    pub fn remaining(&self) -> u64 {
        self.end - self.next
    }
}
