//! Gives the C allocator's free memory back to the system.
//!
//! glibc's `free` returns memory to the system only from the top of a
//! heap; memory freed below a chunk still in use stays in the process
//! (resident, once touched) until `malloc_trim(3)`, which releases every
//! whole free page of every arena. Calling it is always sound: it takes
//! no pointer and each arena's own lock. The host crate keeps
//! `#![forbid(unsafe_code)]`; the call below is that exception. With any
//! other C library (musl, or not Linux) [`trim`] does nothing.

/// Releases the allocator's free pages to the system; true if any were.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes a size and no pointer, and is
        // thread-safe.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    /// Memory freed below memory still in use is given back: the freed
    /// blocks' pages leave the resident set (glibc only).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_below_live_memory_leaves_the_resident_set() {
        fn resident_kib() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        }
        // 64 MiB in 16 KiB blocks (below the mmap threshold, so from the
        // heap), each touched; every second one kept, so that no freed
        // block is at the top of the heap.
        let mut blocks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 16 * 1024]).collect();
        let mut kept = Vec::new();
        for (i, block) in blocks.drain(..).enumerate() {
            if i % 2 == 1 {
                kept.push(block);
            }
        }
        let before = resident_kib();
        assert!(super::trim(), "nothing given back");
        let after = resident_kib();
        // About 32 MiB freed; at least half of it must have gone.
        assert!(
            before - after > 16 * 1024,
            "resident {before} KiB before, {after} KiB after"
        );
        assert_eq!(kept.len(), 2048);
    }
}
