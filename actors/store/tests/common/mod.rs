//! Helpers shared by the store's integration tests.

use spoolfs_core::{Ctx, Fh, Fs, Ino, Timestamp};
use spoolfs_store::Tables;

/// Root, at a fixed time (tests are deterministic).
pub fn ctx() -> Ctx {
    Ctx {
        uid: 0,
        gid: 0,
        pid: 1,
        now: Timestamp::new(1_700_000_000, 0),
    }
}

/// Create `name` in the root, open for writing, with the next inode number.
pub fn create(fs: &mut Fs, t: &mut Tables<'_>, next: &mut u64, name: &str) -> (Ino, Fh) {
    let ino = Ino(*next);
    *next += 1;
    let (_, fh) = fs
        .create(
            t,
            &ctx(),
            Ino::ROOT,
            name.as_bytes(),
            0o644,
            libc::O_RDWR,
            ino,
        )
        .expect("create");
    (ino, fh)
}
