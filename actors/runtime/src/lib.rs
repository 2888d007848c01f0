//! spoolfs runtime: the actor thread that owns all state, its group commit, the memfd
//! staging of file content, and the notify pool.

pub mod actor;
mod callers;
mod committer;
pub mod content;
mod dir_attrs;
pub mod health;
pub mod msg;
pub mod notify;
pub mod pinning;
pub mod space;

pub use actor::{Actor, ActorConfig, ActorHandle, StartError, WeakActorHandle};
pub use health::StorageHealth;
pub use msg::*;
pub use notify::{Invalidation, KernelNotifier, NotifyPool};
pub use space::Reserve;
pub mod metrics;
