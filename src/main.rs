fn main() -> std::process::ExitCode {
    return_large_buffers_to_the_system();
    epic_export::cli::main()
}

/// Buffers of 2 MiB and more (a part being uploaded, a long line) are mapped and unmapped on their
/// own instead of coming from glibc's heap: glibc otherwise raises this threshold after the first such
/// buffer is freed, and parts freed on other threads than the one that read them then stay in the
/// heaps as free memory. Measured: a 120 MiB export to S3 peaks 10 MiB lower.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_large_buffers_to_the_system() {
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 * 1024 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_buffers_to_the_system() {}
