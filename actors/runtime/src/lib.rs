//! spoolfs runtime: the actor thread that owns all state, its group commit, the memfd
//! staging of file content, and the notify pool.

pub mod actor;
pub mod content;
pub mod msg;
pub mod notify;

pub use actor::{Actor, ActorConfig, ActorHandle, StartError, WeakActorHandle};
pub use msg::*;
pub use notify::{Invalidation, KernelNotifier, NotifyPool};
pub mod metrics;
