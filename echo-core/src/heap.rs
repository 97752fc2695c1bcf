//! The C allocator's process-wide settings for a server process.
//!
//! A server of large samples frees tens of thousands of 64 KiB blocks a second
//! (QUIC's per-datagram receive buffers, allocated inside quinn and dropped once
//! their bytes are in a batch). glibc gives the free memory at the top of a
//! heap back to the kernel as soon as more than its trim threshold (128 KiB at
//! first) has collected there, so those blocks keep coming back as fresh pages
//! that the kernel must map and zero again: at 1 MiB samples over QUIC on
//! loopback, 50 to 85 page faults per sample with 64 KiB packets (5 to 25 with
//! 32 KiB ones) and up to a third of the server's CPU time (BENCHMARKS.md,
//! "QUIC"). glibc raises the threshold by itself only after it
//! frees a block of 128 KiB or more that it had mapped separately, which a
//! stream of 64 KiB blocks never does.
//!
//! [`server_heap`] sets the thresholds a busy server wants, as if glibc had
//! already raised them: blocks smaller than [`MMAP_THRESHOLD`] come from the
//! heap, and free memory at the top of a heap is handed back only once more
//! than [`TRIM_THRESHOLD`] has collected there. (Freed blocks below a heap's
//! top were never handed back; they stay for reuse either way.) `echo-server`
//! calls it at start (`--default-heap` leaves glibc's defaults), and so do
//! the benchmark servers. These settings belong to the process, so a library
//! does not make them behind its user's back: a program that embeds an echo
//! server calls [`server_heap`] (or sets `GLIBC_TUNABLES`) itself if it wants
//! them.

/// Blocks smaller than this come from the heap rather than a mapping of their
/// own after [`server_heap`]: 32 MiB, the most glibc's own adaptive threshold
/// reaches on 64-bit systems (32-bit glibc refuses more than 512 KiB, and then
/// keeps its own threshold).
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Free memory [`server_heap`] lets stay at the top of a heap before it is
/// handed back to the kernel: 16 MiB.
pub const TRIM_THRESHOLD: usize = 16 << 20;

/// Sets glibc's `M_MMAP_THRESHOLD` to [`MMAP_THRESHOLD`] and `M_TRIM_THRESHOLD`
/// to [`TRIM_THRESHOLD`] for this process (each on its own: one refused does
/// not keep the other from taking). Returns whether both took: false with
/// other C libraries (nothing is changed there). Call it first thing in
/// `main`, before other threads start: glibc documents `mallopt` as not safe
/// to call while other threads allocate.
pub fn server_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes plain integers (both fit in a C int) and stores
        // them in glibc's parameter block, which glibc's own free() also updates
        // without a lock when it adjusts these thresholds: word-sized stores, so
        // a thread allocating meanwhile sees the old value or the new one.
        let (mmap, trim) = unsafe {
            (
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int),
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int),
            )
        };
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu", target_pointer_width = "64"))]
    fn glibc_takes_the_settings() {
        assert!(super::server_heap());
        // Idempotent.
        assert!(super::server_heap());
    }
}
