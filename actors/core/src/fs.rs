//! Filesystem semantics: one method per FUSE operation, over a `Store`.
//!
//! Each mutating method first checks everything it can with reads only and returns the errno
//! before its first write ("check, then apply"), so a failed operation never leaves half a
//! mutation in a batch. Permission bits are enforced by the kernel (`default_permissions`):
//! FUSE requests carry no supplementary groups, so the daemon could not check them correctly.
//! Ownership side effects the kernel leaves to us (setgid inheritance, link counts, times)
//! are applied here.

use std::collections::HashMap;

use crate::data;
use crate::store::{Store, StoreError};
use crate::types::*;

pub type FsResult<T> = Result<T, Errno>;

impl From<StoreError> for Errno {
    fn from(_: StoreError) -> Errno {
        Errno::EIO
    }
}

/// What an open handle refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handle {
    pub ino: Ino,
    pub writable: bool,
    pub readable: bool,
    /// For directories: the listing taken at the first readdir, so offsets stay stable while
    /// entries are added and removed (POSIX only requires entries present throughout to be
    /// returned exactly once).
    pub listing: Option<Vec<DirEntry>>,
}

/// rename(2) flags understood by `rename`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

/// setxattr(2) flags.
pub const XATTR_CREATE: i32 = 1;
pub const XATTR_REPLACE: i32 = 2;

/// fallocate(2) modes we implement.
pub const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;

/// The in-memory part of the filesystem state that lives only as long as the mount: kernel
/// lookup counts and open handles. Persistent state is in the store.
#[derive(Debug)]
pub struct Fs {
    pub limits: Limits,
    lookups: HashMap<Ino, u64>,
    handles: HashMap<Fh, Handle>,
    open_count: HashMap<Ino, u32>,
    writers: HashMap<Ino, u32>,
    next_fh: u64,
}

fn check_name(limits: &Limits, name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Errno::EINVAL);
    }
    if name.len() > limits.name_max {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(())
}

/// With `FUSE_HANDLE_KILLPRIV_V2` the kernel leaves this to the filesystem, as the VFS does it
/// for local ones (`should_remove_suid`, `security_inode_killpriv`): clear set-user-ID, clear
/// set-group-ID when the group may execute (without group execute it marks mandatory
/// locking and stays), and remove file capabilities. True if anything changed.
fn drop_privileges(s: &mut impl Store, inode: &mut Inode) -> FsResult<bool> {
    let before = inode.perm;
    inode.perm &= !libc::S_ISUID;
    if inode.perm & (libc::S_ISGID | libc::S_IXGRP) == (libc::S_ISGID | libc::S_IXGRP) {
        inode.perm &= !libc::S_ISGID;
    }
    let mut changed = inode.perm != before;
    if s.xattr(inode.ino, SECURITY_CAPABILITY)?.is_some() {
        s.remove_xattr(inode.ino, SECURITY_CAPABILITY)?;
        changed = true;
    }
    Ok(changed)
}

/// The xattr holding file capabilities.
const SECURITY_CAPABILITY: &[u8] = b"security.capability";

/// The name as a new entry may take it: `.` and `..` always exist.
fn check_new_name(limits: &Limits, name: &[u8]) -> FsResult<()> {
    check_name(limits, name)?;
    if name == b"." || name == b".." {
        return Err(Errno::EEXIST);
    }
    Ok(())
}

fn resolve(t: SetTime, now: Timestamp) -> Timestamp {
    match t {
        SetTime::At(ts) => ts,
        SetTime::Now => now,
    }
}

impl Default for Fs {
    fn default() -> Self {
        Fs::new(Limits::default())
    }
}

impl Fs {
    pub fn new(limits: Limits) -> Self {
        Fs {
            limits,
            lookups: HashMap::new(),
            handles: HashMap::new(),
            open_count: HashMap::new(),
            writers: HashMap::new(),
            next_fh: 1,
        }
    }

    /// Create the root directory of an empty store. Idempotent.
    pub fn init_root(&mut self, s: &mut impl Store, ctx: &Ctx, perm: u32) -> FsResult<Inode> {
        if let Some(root) = s.inode(Ino::ROOT)? {
            return Ok(root);
        }
        let root = Inode::new(
            Ino::ROOT,
            Kind::Dir,
            perm & PERM_MASK,
            (ctx.uid, ctx.gid),
            ctx.now,
            Ino::ROOT,
        );
        s.put_inode(&root)?;
        Ok(root)
    }

    /// Reclaim inodes that were unlinked while still in use when the daemon last stopped:
    /// after a restart the kernel holds no references, so every orphan is garbage.
    pub fn reclaim_orphans(&mut self, s: &mut impl Store) -> FsResult<usize> {
        let orphans = s.orphans()?;
        for ino in &orphans {
            s.remove_inode(*ino)?;
            s.remove_orphan(*ino)?;
        }
        Ok(orphans.len())
    }

    pub fn open_handles(&self) -> usize {
        self.handles.len()
    }

    pub fn known_inodes(&self) -> usize {
        self.lookups.len()
    }

    pub fn handle(&self, fh: Fh) -> Option<&Handle> {
        self.handles.get(&fh)
    }

    fn get(&self, s: &mut impl Store, ino: Ino) -> FsResult<Inode> {
        s.inode(ino)?.ok_or(Errno::ENOENT)
    }

    fn get_dir(&self, s: &mut impl Store, ino: Ino) -> FsResult<Inode> {
        let inode = self.get(s, ino)?;
        if inode.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        Ok(inode)
    }

    fn remember(&mut self, ino: Ino) {
        *self.lookups.entry(ino).or_insert(0) += 1;
    }

    /// Whether anything (the kernel's dentry cache or an open handle) still refers to `ino`.
    fn in_use(&self, ino: Ino) -> bool {
        self.lookups.contains_key(&ino) || self.open_count.contains_key(&ino)
    }

    /// Drop one link of `inode` (already saved by the caller if still linked) and free it once
    /// nothing refers to it any more, or park it in the orphan table until then.
    fn unlinked(&mut self, s: &mut impl Store, inode: &mut Inode, now: Timestamp) -> FsResult<()> {
        if inode.kind == Kind::Dir {
            inode.nlink = 0;
        } else {
            inode.nlink = inode.nlink.saturating_sub(1);
        }
        inode.ctime = now;
        if inode.nlink > 0 {
            return Ok(s.put_inode(inode)?);
        }
        if self.in_use(inode.ino) {
            s.put_inode(inode)?;
            s.add_orphan(inode.ino)?;
        } else {
            s.remove_inode(inode.ino)?;
        }
        Ok(())
    }

    /// Free `ino` if it has no links and nothing refers to it any more.
    fn maybe_reclaim(&mut self, s: &mut impl Store, ino: Ino) -> FsResult<()> {
        if self.in_use(ino) {
            return Ok(());
        }
        if let Some(inode) = s.inode(ino)? {
            if inode.nlink == 0 {
                s.remove_inode(ino)?;
                s.remove_orphan(ino)?;
            }
        }
        Ok(())
    }

    // --- lookups ---------------------------------------------------------------------------

    pub fn lookup(&mut self, s: &mut impl Store, parent: Ino, name: &[u8]) -> FsResult<Inode> {
        let dir = self.get_dir(s, parent)?;
        check_name(&self.limits, name)?;
        let ino = match name {
            b"." => dir.ino,
            b".." => dir.parent,
            _ => s.dentry(parent, name)?.ok_or(Errno::ENOENT)?.ino,
        };
        let inode = self.get(s, ino)?;
        self.remember(ino);
        Ok(inode)
    }

    pub fn forget(&mut self, s: &mut impl Store, ino: Ino, n: u64) -> FsResult<()> {
        if let Some(count) = self.lookups.get_mut(&ino) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                self.lookups.remove(&ino);
                self.maybe_reclaim(s, ino)?;
            }
        }
        // A FORGET for an inode we never handed out is ignored: there is nothing to answer.
        Ok(())
    }

    pub fn getattr(&mut self, s: &mut impl Store, ino: Ino) -> FsResult<Inode> {
        self.get(s, ino)
    }

    pub fn setattr(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        ino: Ino,
        set: &SetAttr,
    ) -> FsResult<Inode> {
        let mut inode = self.get(s, ino)?;
        if let Some(size) = set.size {
            match inode.kind {
                Kind::File => {}
                Kind::Dir => return Err(Errno::EISDIR),
                _ => return Err(Errno::EINVAL),
            }
            if size > self.limits.file_size_max {
                return Err(Errno::EFBIG);
            }
            if let Some(fh) = set.fh {
                let h = self.handles.get(&fh).ok_or(Errno::EBADF)?;
                if !h.writable {
                    return Err(Errno::EBADF);
                }
            }
        }
        let mut changed = false;
        if let Some(mode) = set.mode {
            inode.perm = mode & PERM_MASK;
            changed = true;
        }
        if let Some(uid) = set.uid {
            inode.uid = uid;
            changed = true;
        }
        if let Some(gid) = set.gid {
            inode.gid = gid;
            changed = true;
        }
        // chown of anything but a directory drops the set-ID bits, whoever asks (VFS
        // `chown_common`); a size change does when the caller lacks CAP_FSETID (root here).
        if (set.uid.is_some() || set.gid.is_some()) && inode.kind != Kind::Dir
            || set.size.is_some() && ctx.uid != 0
        {
            drop_privileges(s, &mut inode)?;
        }
        if let Some(size) = set.size {
            data::truncate(s, ino, inode.size, size)?;
            if size != inode.size {
                inode.mtime = ctx.now;
            }
            inode.size = size;
            changed = true;
        }
        if let Some(t) = set.atime {
            inode.atime = resolve(t, ctx.now);
            changed = true;
        }
        if let Some(t) = set.mtime {
            inode.mtime = resolve(t, ctx.now);
            changed = true;
        }
        if let Some(t) = set.ctime {
            inode.ctime = t;
        } else if changed {
            inode.ctime = ctx.now;
        }
        s.put_inode(&inode)?;
        Ok(inode)
    }

    pub fn readlink(&mut self, s: &mut impl Store, ino: Ino) -> FsResult<Vec<u8>> {
        let inode = self.get(s, ino)?;
        if inode.kind != Kind::Symlink {
            return Err(Errno::EINVAL);
        }
        s.symlink_target(ino)?.ok_or(Errno::EIO)
    }

    // --- creating entries -----------------------------------------------------------------

    /// The directory `parent` if `name` can be created in it: a valid new name, a directory
    /// that still exists, no entry of that name yet.
    fn dir_for_new_entry(&self, s: &mut impl Store, parent: Ino, name: &[u8]) -> FsResult<Inode> {
        let dir = self.get_dir(s, parent)?;
        check_new_name(&self.limits, name)?;
        if dir.nlink == 0 {
            // The directory was removed while a process still had it as its cwd.
            return Err(Errno::ENOENT);
        }
        if s.dentry(parent, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        Ok(dir)
    }

    /// Common part of mknod, mkdir, symlink and create: check the name, build the inode with
    /// setgid inheritance, link it into `parent`.
    #[allow(clippy::too_many_arguments)]
    fn make_node(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        kind: Kind,
        perm: u32,
        rdev: u32,
        new_ino: Ino,
    ) -> FsResult<Inode> {
        let mut dir = self.dir_for_new_entry(s, parent, name)?;
        if s.inode(new_ino)?.is_some() {
            // The runtime hands out fresh numbers; a collision means a corrupt counter.
            return Err(Errno::EIO);
        }
        if kind == Kind::Dir && dir.nlink >= self.limits.link_max {
            return Err(Errno::EMLINK);
        }
        let mut perm = perm & PERM_MASK;
        // A setgid directory hands its group down, and its setgid bit to subdirectories.
        let gid = if dir.perm & libc::S_ISGID != 0 {
            if kind == Kind::Dir {
                perm |= libc::S_ISGID;
            }
            dir.gid
        } else {
            ctx.gid
        };
        let inode = Inode {
            rdev,
            ..Inode::new(new_ino, kind, perm, (ctx.uid, gid), ctx.now, parent)
        };
        s.put_inode(&inode)?;
        s.put_dentry(parent, name, Dentry { ino: new_ino, kind })?;
        if kind == Kind::Dir {
            dir.nlink += 1;
        }
        dir.mtime = ctx.now;
        dir.ctime = ctx.now;
        s.put_inode(&dir)?;
        self.remember(new_ino);
        Ok(inode)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        new_ino: Ino,
    ) -> FsResult<Inode> {
        let kind = Kind::from_mode(mode).ok_or(Errno::EINVAL)?;
        if matches!(kind, Kind::Dir | Kind::Symlink) {
            return Err(Errno::EINVAL);
        }
        let rdev = if matches!(kind, Kind::CharDev | Kind::BlockDev) {
            rdev
        } else {
            0
        };
        self.make_node(s, ctx, parent, name, kind, mode, rdev, new_ino)
    }

    pub fn mkdir(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        new_ino: Ino,
    ) -> FsResult<Inode> {
        self.make_node(s, ctx, parent, name, Kind::Dir, mode, 0, new_ino)
    }

    pub fn symlink(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        new_ino: Ino,
    ) -> FsResult<Inode> {
        if target.is_empty() {
            return Err(Errno::ENOENT);
        }
        if target.len() > self.limits.symlink_max {
            return Err(Errno::ENAMETOOLONG);
        }
        let mut inode = self.make_node(s, ctx, parent, name, Kind::Symlink, 0o777, 0, new_ino)?;
        inode.size = target.len() as u64;
        s.put_inode(&inode)?;
        s.put_symlink_target(new_ino, target)?;
        Ok(inode)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        mode: u32,
        flags: i32,
        new_ino: Ino,
    ) -> FsResult<(Inode, Fh)> {
        let inode = self.make_node(s, ctx, parent, name, Kind::File, mode, 0, new_ino)?;
        let fh = self.open_handle(s, &inode, flags)?;
        Ok((inode, fh))
    }

    pub fn link(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        ino: Ino,
        new_parent: Ino,
        new_name: &[u8],
    ) -> FsResult<Inode> {
        let mut inode = self.get(s, ino)?;
        // The new name is checked before the source, as linkat(2) does (filename_create,
        // then vfs_link): linking a directory onto an existing name is EEXIST, not EPERM.
        let mut dir = self.dir_for_new_entry(s, new_parent, new_name)?;
        if inode.kind == Kind::Dir {
            return Err(Errno::EPERM);
        }
        if inode.nlink == 0 {
            return Err(Errno::ENOENT);
        }
        if inode.nlink >= self.limits.link_max {
            return Err(Errno::EMLINK);
        }
        inode.nlink += 1;
        inode.ctime = ctx.now;
        s.put_inode(&inode)?;
        s.put_dentry(
            new_parent,
            new_name,
            Dentry {
                ino,
                kind: inode.kind,
            },
        )?;
        dir.mtime = ctx.now;
        dir.ctime = ctx.now;
        s.put_inode(&dir)?;
        self.remember(ino);
        Ok(inode)
    }

    // --- removing entries -----------------------------------------------------------------

    pub fn unlink(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
    ) -> FsResult<()> {
        let mut dir = self.get_dir(s, parent)?;
        check_name(&self.limits, name)?;
        let d = s.dentry(parent, name)?.ok_or(Errno::ENOENT)?;
        if d.kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        let mut inode = self.get(s, d.ino)?;
        s.remove_dentry(parent, name)?;
        dir.mtime = ctx.now;
        dir.ctime = ctx.now;
        s.put_inode(&dir)?;
        self.unlinked(s, &mut inode, ctx.now)
    }

    pub fn rmdir(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
    ) -> FsResult<()> {
        let mut dir = self.get_dir(s, parent)?;
        check_name(&self.limits, name)?;
        match name {
            b"." => return Err(Errno::EINVAL),
            b".." => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        let d = s.dentry(parent, name)?.ok_or(Errno::ENOENT)?;
        if d.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        if !s.dentries(d.ino, None, 1)?.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        let mut child = self.get(s, d.ino)?;
        s.remove_dentry(parent, name)?;
        dir.nlink = dir.nlink.saturating_sub(1);
        dir.mtime = ctx.now;
        dir.ctime = ctx.now;
        s.put_inode(&dir)?;
        self.unlinked(s, &mut child, ctx.now)
    }

    /// Whether `ancestor` is `dir` or one of its ancestors (walking `parent` pointers up to
    /// the root). Used to refuse moving a directory into its own subtree.
    fn is_ancestor(&self, s: &mut impl Store, ancestor: Ino, dir: Ino) -> FsResult<bool> {
        let mut cur = dir;
        // The depth bound turns a corrupt parent chain into EIO instead of a hang.
        for _ in 0..100_000 {
            if cur == ancestor {
                return Ok(true);
            }
            if cur == Ino::ROOT {
                return Ok(false);
            }
            cur = self.get(s, cur)?.parent;
        }
        Err(Errno::EIO)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rename(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> FsResult<()> {
        if flags.noreplace && flags.exchange {
            return Err(Errno::EINVAL);
        }
        self.get_dir(s, parent)?;
        let new_dir = self.get_dir(s, new_parent)?;
        check_name(&self.limits, name)?;
        check_name(&self.limits, new_name)?;
        if matches!(name, b"." | b"..") || matches!(new_name, b"." | b"..") {
            return Err(Errno::EBUSY);
        }
        let src = s.dentry(parent, name)?.ok_or(Errno::ENOENT)?;
        if new_dir.nlink == 0 {
            // The target directory was removed (it is still open somewhere): an entry added
            // now could never be removed again, and would leak with the directory.
            return Err(Errno::ENOENT);
        }
        let dst = s.dentry(new_parent, new_name)?;
        // Checks in Linux's order (do_renameat2, then vfs_rename): the flags, then the
        // lock_rename traps (neither name may be an ancestor of the other's parent), then
        // the kinds and emptiness of the two entries.
        if flags.noreplace && dst.is_some() {
            return Err(Errno::EEXIST);
        }
        if flags.exchange && dst.is_none() {
            return Err(Errno::ENOENT);
        }
        if parent != new_parent {
            if src.kind == Kind::Dir && self.is_ancestor(s, src.ino, new_parent)? {
                return Err(Errno::EINVAL);
            }
            if let Some(dst) = dst {
                if dst.kind == Kind::Dir && self.is_ancestor(s, dst.ino, parent)? {
                    // The target contains the source, so it is not empty.
                    return Err(if flags.exchange {
                        Errno::EINVAL
                    } else {
                        Errno::ENOTEMPTY
                    });
                }
            }
        }
        if flags.exchange {
            let dst = dst.ok_or(Errno::ENOENT)?;
            return self.exchange(s, ctx, (parent, name, src), (new_parent, new_name, dst));
        }
        if let Some(dst) = dst {
            if dst.ino == src.ino {
                // Two links to the same inode: POSIX says do nothing and succeed.
                return Ok(());
            }
            match (src.kind == Kind::Dir, dst.kind == Kind::Dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) => {
                    if !s.dentries(dst.ino, None, 1)?.is_empty() {
                        return Err(Errno::ENOTEMPTY);
                    }
                }
                (false, false) => {}
            }
        }
        if src.kind == Kind::Dir
            && parent != new_parent
            && dst.is_none()
            && new_dir.nlink >= self.limits.link_max
        {
            return Err(Errno::EMLINK);
        }
        // Checks done: apply.
        let mut moved = self.get(s, src.ino)?;
        if let Some(dst) = dst {
            let mut victim = self.get(s, dst.ino)?;
            if victim.kind == Kind::Dir {
                let mut nd = self.get(s, new_parent)?;
                nd.nlink = nd.nlink.saturating_sub(1);
                s.put_inode(&nd)?;
            }
            self.unlinked(s, &mut victim, ctx.now)?;
        }
        s.remove_dentry(parent, name)?;
        s.put_dentry(new_parent, new_name, src)?;
        if src.kind == Kind::Dir && parent != new_parent {
            moved.parent = new_parent;
        }
        moved.ctime = ctx.now;
        s.put_inode(&moved)?;
        let dir_delta = i64::from(src.kind == Kind::Dir && parent != new_parent);
        self.touch_dir(s, parent, -dir_delta, ctx.now)?;
        if new_parent != parent {
            self.touch_dir(s, new_parent, dir_delta, ctx.now)?;
        }
        Ok(())
    }

    /// RENAME_EXCHANGE: swap two entries atomically.
    fn exchange(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        a: (Ino, &[u8], Dentry),
        b: (Ino, &[u8], Dentry),
    ) -> FsResult<()> {
        let (pa, na, da) = a;
        let (pb, nb, db) = b;
        if da.ino == db.ino {
            return Ok(());
        }
        if pa != pb {
            if da.kind == Kind::Dir && self.is_ancestor(s, da.ino, pb)? {
                return Err(Errno::EINVAL);
            }
            if db.kind == Kind::Dir && self.is_ancestor(s, db.ino, pa)? {
                return Err(Errno::EINVAL);
            }
        }
        let mut ia = self.get(s, da.ino)?;
        let mut ib = self.get(s, db.ino)?;
        s.put_dentry(pa, na, db)?;
        s.put_dentry(pb, nb, da)?;
        if pa != pb {
            if ia.kind == Kind::Dir {
                ia.parent = pb;
            }
            if ib.kind == Kind::Dir {
                ib.parent = pa;
            }
        }
        ia.ctime = ctx.now;
        ib.ctime = ctx.now;
        s.put_inode(&ia)?;
        s.put_inode(&ib)?;
        let delta = i64::from(ia.kind == Kind::Dir) - i64::from(ib.kind == Kind::Dir);
        if pa == pb {
            self.touch_dir(s, pa, 0, ctx.now)?;
        } else {
            self.touch_dir(s, pa, -delta, ctx.now)?;
            self.touch_dir(s, pb, delta, ctx.now)?;
        }
        Ok(())
    }

    /// Update a directory's mtime/ctime after its entries changed, adjusting its link count
    /// by `nlink_delta` subdirectories.
    fn touch_dir(
        &self,
        s: &mut impl Store,
        dir: Ino,
        nlink_delta: i64,
        now: Timestamp,
    ) -> FsResult<()> {
        let mut d = self.get(s, dir)?;
        let nlink = i64::from(d.nlink) + nlink_delta;
        d.nlink = u32::try_from(nlink).map_err(|_| Errno::EIO)?;
        d.mtime = now;
        d.ctime = now;
        Ok(s.put_inode(&d)?)
    }

    // --- open files -----------------------------------------------------------------------

    fn open_handle(&mut self, s: &mut impl Store, inode: &Inode, flags: i32) -> FsResult<Fh> {
        let acc = flags & libc::O_ACCMODE;
        let writable = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let readable = acc == libc::O_RDONLY || acc == libc::O_RDWR;
        if writable && inode.kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        let fh = Fh(self.next_fh);
        self.next_fh = self.next_fh.checked_add(1).ok_or(Errno::ENFILE)?;
        if writable && inode.kind == Kind::File {
            s.open_for_write(inode.ino)?;
            *self.writers.entry(inode.ino).or_insert(0) += 1;
        }
        *self.open_count.entry(inode.ino).or_insert(0) += 1;
        self.handles.insert(
            fh,
            Handle {
                ino: inode.ino,
                writable,
                readable,
                listing: None,
            },
        );
        Ok(fh)
    }

    pub fn open(&mut self, s: &mut impl Store, ino: Ino, flags: i32) -> FsResult<Fh> {
        let inode = self.get(s, ino)?;
        self.open_handle(s, &inode, flags)
    }

    pub fn opendir(&mut self, s: &mut impl Store, ino: Ino) -> FsResult<Fh> {
        let inode = self.get_dir(s, ino)?;
        self.open_handle(s, &inode, libc::O_RDONLY)
    }

    fn handle_for(&self, fh: Fh, ino: Ino) -> FsResult<&Handle> {
        match self.handles.get(&fh) {
            Some(h) if h.ino == ino => Ok(h),
            _ => Err(Errno::EBADF),
        }
    }

    pub fn read(
        &mut self,
        s: &mut impl Store,
        ino: Ino,
        fh: Fh,
        offset: u64,
        size: u32,
    ) -> FsResult<Vec<u8>> {
        let h = self.handle_for(fh, ino)?;
        if !h.readable {
            return Err(Errno::EBADF);
        }
        let inode = self.get(s, ino)?;
        if inode.kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        if offset >= inode.size {
            return Ok(Vec::new());
        }
        let len = u64::from(size).min(inode.size - offset);
        let len = usize::try_from(len).map_err(|_| Errno::EINVAL)?;
        data::read(s, ino, offset, len)
    }

    pub fn write(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        ino: Ino,
        fh: Fh,
        offset: u64,
        buf: &[u8],
    ) -> FsResult<u32> {
        let h = self.handle_for(fh, ino)?;
        if !h.writable {
            return Err(Errno::EBADF);
        }
        let len = u32::try_from(buf.len()).map_err(|_| Errno::EINVAL)?;
        let end = offset
            .checked_add(u64::from(len))
            .filter(|end| *end <= self.limits.file_size_max)
            .ok_or(Errno::EFBIG)?;
        let mut inode = self.get(s, ino)?;
        if inode.kind != Kind::File {
            return Err(Errno::EINVAL);
        }
        if buf.is_empty() {
            // A write of nothing changes nothing (generic_write_checks returns early): above
            // all it must not extend the file to `offset`, nor touch mtime.
            return Ok(0);
        }
        data::write(s, ino, offset, buf)?;
        inode.size = inode.size.max(end);
        inode.mtime = ctx.now;
        inode.ctime = ctx.now;
        s.stage_inode(&inode)?;
        Ok(len)
    }

    /// A write by a caller without CAP_FSETID (the kernel says so with
    /// `FUSE_WRITE_KILL_SUIDGID`): drop the set-ID bits and file capabilities first.
    pub fn kill_privileges(&mut self, s: &mut impl Store, ino: Ino) -> FsResult<()> {
        let mut inode = self.get(s, ino)?;
        if inode.kind == Kind::File && drop_privileges(s, &mut inode)? {
            s.put_inode(&inode)?;
        }
        Ok(())
    }

    /// FLUSH (close) and fsync: the file's staged content is persisted whatever the handle's
    /// mode (fsync of a read-only descriptor still makes the file's data durable, as on any
    /// Linux filesystem; content another handle wrote is staged per file, not per handle).
    pub fn flush(&mut self, s: &mut impl Store, ino: Ino, fh: Fh) -> FsResult<()> {
        let h = self.handle_for(fh, ino)?;
        s.flush(h.ino)?;
        Ok(())
    }

    pub fn release(&mut self, s: &mut impl Store, ino: Ino, fh: Fh) -> FsResult<()> {
        let h = self.handles.remove(&fh).ok_or(Errno::EBADF)?;
        let ino = if h.ino == ino { ino } else { h.ino };
        if h.writable {
            s.flush(ino)?;
            if let Some(w) = self.writers.get_mut(&ino) {
                *w -= 1;
                if *w == 0 {
                    self.writers.remove(&ino);
                    s.close_content(ino)?;
                }
            }
        }
        if let Some(c) = self.open_count.get_mut(&ino) {
            *c -= 1;
            if *c == 0 {
                self.open_count.remove(&ino);
                self.maybe_reclaim(s, ino)?;
            }
        }
        Ok(())
    }

    /// Directory listing from `offset` (0 = start; each entry's cookie is its position + 1).
    /// The first call takes a snapshot of the directory into the handle.
    pub fn readdir(
        &mut self,
        s: &mut impl Store,
        ino: Ino,
        fh: Fh,
        offset: u64,
    ) -> FsResult<Vec<(u64, DirEntry)>> {
        self.handle_for(fh, ino)?;
        let needs_listing =
            offset == 0 || self.handles.get(&fh).is_some_and(|h| h.listing.is_none());
        if needs_listing {
            let listing = self.list_dir(s, ino)?;
            if let Some(h) = self.handles.get_mut(&fh) {
                h.listing = Some(listing);
            }
        }
        let listing = self
            .handles
            .get(&fh)
            .and_then(|h| h.listing.as_ref())
            .ok_or(Errno::EBADF)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        Ok(listing
            .iter()
            .enumerate()
            .skip(start)
            .map(|(i, e)| (i as u64 + 1, e.clone()))
            .collect())
    }

    /// Like readdir, with each entry's attributes; counts a lookup for every entry returned
    /// (the caller passes how many it could fit so uncounted entries are not remembered).
    pub fn readdirplus_entry(&mut self, s: &mut impl Store, entry: &DirEntry) -> FsResult<Inode> {
        let inode = self.get(s, entry.ino)?;
        self.remember(entry.ino);
        Ok(inode)
    }

    fn list_dir(&self, s: &mut impl Store, ino: Ino) -> FsResult<Vec<DirEntry>> {
        let dir = self.get_dir(s, ino)?;
        let mut out = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: b".".to_vec(),
            },
            DirEntry {
                ino: dir.parent,
                kind: Kind::Dir,
                name: b"..".to_vec(),
            },
        ];
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = s.dentries(ino, after.as_deref(), 1024)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            out.extend(page.into_iter().map(|(name, d)| DirEntry {
                ino: d.ino,
                kind: d.kind,
                name,
            }));
        }
        Ok(out)
    }

    pub fn releasedir(&mut self, s: &mut impl Store, ino: Ino, fh: Fh) -> FsResult<()> {
        self.release(s, ino, fh)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn fallocate(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        ino: Ino,
        fh: Fh,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> FsResult<()> {
        let h = self.handle_for(fh, ino)?;
        if !h.writable {
            return Err(Errno::EBADF);
        }
        if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE) != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let punch = mode & FALLOC_FL_PUNCH_HOLE != 0;
        if punch && mode & FALLOC_FL_KEEP_SIZE == 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if length == 0 {
            return Err(Errno::EINVAL);
        }
        let end = offset
            .checked_add(length)
            .filter(|end| *end <= self.limits.file_size_max)
            .ok_or(Errno::EFBIG)?;
        let mut inode = self.get(s, ino)?;
        if inode.kind != Kind::File {
            return Err(Errno::ENODEV);
        }
        if punch {
            data::punch_hole(s, ino, offset, end.min(inode.size), inode.size)?;
            inode.mtime = ctx.now;
            inode.ctime = ctx.now;
            s.put_inode(&inode)?;
        } else if mode & FALLOC_FL_KEEP_SIZE == 0 && end > inode.size {
            // Space is not reserved ahead (content is stored by chunk); growing the size is
            // what a caller can observe.
            inode.size = end;
            inode.mtime = ctx.now;
            inode.ctime = ctx.now;
            s.put_inode(&inode)?;
        }
        Ok(())
    }

    /// lseek with SEEK_DATA / SEEK_HOLE (other whences are handled by the kernel).
    pub fn lseek(
        &mut self,
        s: &mut impl Store,
        ino: Ino,
        fh: Fh,
        offset: i64,
        whence: i32,
    ) -> FsResult<i64> {
        self.handle_for(fh, ino)?;
        let inode = self.get(s, ino)?;
        let offset = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
        if offset >= inode.size {
            return Err(Errno::ENXIO);
        }
        let pos = match whence {
            libc::SEEK_DATA => data::seek_data(s, ino, offset, inode.size)?,
            libc::SEEK_HOLE => data::seek_hole(s, ino, offset, inode.size)?,
            _ => return Err(Errno::EINVAL),
        };
        let pos = pos.ok_or(Errno::ENXIO)?;
        i64::try_from(pos).map_err(|_| Errno::EOVERFLOW)
    }

    // --- xattrs ---------------------------------------------------------------------------

    /// Namespaces we store. `system.` (POSIX ACLs) is not supported: ACLs would have to be
    /// enforced, and the kernel does that only for filesystems that declare ACL support.
    fn check_xattr_name(&self, inode: &Inode, name: &[u8]) -> FsResult<()> {
        // A bare namespace prefix names nothing (EINVAL, as ext4 and tmpfs answer).
        if name.is_empty() || matches!(name, b"user." | b"trusted." | b"security.") {
            return Err(Errno::EINVAL);
        }
        if name.len() > self.limits.xattr_name_max {
            return Err(Errno::ERANGE);
        }
        if name.starts_with(b"user.") {
            // Linux allows user xattrs on regular files and directories only.
            if !matches!(inode.kind, Kind::File | Kind::Dir) {
                return Err(Errno::EPERM);
            }
            return Ok(());
        }
        if name.starts_with(b"trusted.") || name.starts_with(b"security.") {
            return Ok(());
        }
        Err(Errno::EOPNOTSUPP)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn setxattr(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: i32,
    ) -> FsResult<()> {
        let mut inode = self.get(s, ino)?;
        self.check_xattr_name(&inode, name)?;
        if value.len() > self.limits.xattr_value_max {
            return Err(Errno::E2BIG);
        }
        if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 {
            return Err(Errno::EINVAL);
        }
        let exists = s.xattr(ino, name)?.is_some();
        if flags & XATTR_CREATE != 0 && exists {
            return Err(Errno::EEXIST);
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return Err(Errno::ENODATA);
        }
        s.put_xattr(ino, name, value)?;
        inode.ctime = ctx.now;
        s.put_inode(&inode)?;
        Ok(())
    }

    pub fn getxattr(&mut self, s: &mut impl Store, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        let inode = self.get(s, ino)?;
        // A bare namespace prefix names nothing (EINVAL, as ext4 and tmpfs answer).
        if name.is_empty() || matches!(name, b"user." | b"trusted." | b"security.") {
            return Err(Errno::EINVAL);
        }
        if name.len() > self.limits.xattr_name_max {
            return Err(Errno::ERANGE);
        }
        if !(name.starts_with(b"user.")
            || name.starts_with(b"trusted.")
            || name.starts_with(b"security."))
        {
            return Err(Errno::EOPNOTSUPP);
        }
        let _ = inode;
        s.xattr(ino, name)?.ok_or(Errno::ENODATA)
    }

    /// All names, each followed by a NUL, as listxattr(2) returns them.
    pub fn listxattr(&mut self, s: &mut impl Store, ino: Ino) -> FsResult<Vec<u8>> {
        self.get(s, ino)?;
        let mut out = Vec::new();
        for name in s.xattr_names(ino)? {
            out.extend_from_slice(&name);
            out.push(0);
        }
        Ok(out)
    }

    pub fn removexattr(
        &mut self,
        s: &mut impl Store,
        ctx: &Ctx,
        ino: Ino,
        name: &[u8],
    ) -> FsResult<()> {
        let mut inode = self.get(s, ino)?;
        self.check_xattr_name(&inode, name)?;
        if s.xattr(ino, name)?.is_none() {
            return Err(Errno::ENODATA);
        }
        s.remove_xattr(ino, name)?;
        inode.ctime = ctx.now;
        s.put_inode(&inode)?;
        Ok(())
    }

    /// access(2) when the kernel does not check permissions itself (no default_permissions).
    /// Uses the caller's primary group only: FUSE does not pass supplementary groups.
    pub fn access(&mut self, s: &mut impl Store, ctx: &Ctx, ino: Ino, mask: i32) -> FsResult<()> {
        let inode = self.get(s, ino)?;
        if mask == libc::F_OK || ctx.uid == 0 {
            return Ok(());
        }
        let bits = if ctx.uid == inode.uid {
            inode.perm >> 6
        } else if ctx.gid == inode.gid {
            inode.perm >> 3
        } else {
            inode.perm
        } & 7;
        if (mask as u32) & !bits & 7 != 0 {
            return Err(Errno::EACCES);
        }
        Ok(())
    }
}
