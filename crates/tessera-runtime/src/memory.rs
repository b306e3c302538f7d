//! The allocator of every service binary (issue 20, decision 25): jemalloc,
//! with its background threads purging freed pages, so memory a large job
//! used goes back to the OS about ten seconds (jemalloc's default decay)
//! after the job, even when the service then sits idle. glibc's malloc kept
//! most of it (`malloc_trim` would need unsafe FFI, which the workspace
//! forbids).
//!
//! Each service's `main.rs` names the allocator once and calls [`start`]
//! first thing:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOC: tessera_runtime::memory::Allocator = tessera_runtime::memory::ALLOCATOR;
//!
//! fn main() -> ExitCode {
//!     tessera_runtime::memory::start();
//!     // ...
//! }
//! ```
//!
//! Library code and tests keep the system allocator (only a binary can set
//! the global allocator); [`start`] then configures a jemalloc nobody uses,
//! which is harmless.

/// The service binaries' global allocator.
pub type Allocator = tikv_jemallocator::Jemalloc;

/// The value to put in the `#[global_allocator]` static.
pub const ALLOCATOR: Allocator = tikv_jemallocator::Jemalloc;

/// Turns jemalloc's background purging threads on. Without them, freed
/// pages are only returned during later allocations, so an idle service
/// would keep a large job's memory. Failure (a platform without background
/// thread support) is reported on stderr and is not fatal: memory is then
/// returned on the next allocations instead.
pub fn start() {
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("memory: jemalloc background purging not enabled: {e}");
    }
}

/// Whether jemalloc's background purging threads are on (false when they
/// could not be read).
pub fn background_purging() -> bool {
    tikv_jemalloc_ctl::background_thread::read().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_turns_background_purging_on() {
        start();
        assert!(background_purging());
    }
}
