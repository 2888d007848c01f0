//! spoolfs core: the filesystem's semantics as a deterministic state machine.
//!
//! No IO, no clock, no threads: every input (caller ids, time, new inode numbers) arrives as
//! an argument, every persistent effect goes through the [`Store`] port. The runtime drives it
//! from the actor thread; tests drive it directly with [`MemStore`].

pub mod data;
pub mod fs;
pub mod mem_store;
pub mod store;
pub mod types;

pub use fs::{Fs, FsResult, Handle, RenameFlags};
pub use mem_store::MemStore;
pub use store::{Store, StoreError, StoreResult};
pub use types::*;
