//! The reference model: a plain in-memory tree, written from the Linux man pages and VFS
//! rather than from the core.
//!
//! Link counts are not stored: they are computed from the tree (a non-directory has one link
//! per entry naming it; a directory that is still linked has 2 + its subdirectories, a removed
//! one 0). An inode lives while it has links, an open handle or a kernel reference; dead ones
//! are collected before every snapshot. Errno precedence follows `fs/namei.c`: path-level
//! checks (lookups of both names, EEXIST, ancestor traps) before type checks, before
//! emptiness.

use std::collections::{BTreeMap, BTreeSet};

use spoolfs_core::{Errno, Kind, RenameFlags, Timestamp};

use super::{Attr, Contents, NodeView, Res, Side, Snapshot};

pub const ROOT: u64 = 1;
/// The credentials of every request (the root belongs to 0:0).
pub const UID: u32 = 1000;
pub const GID: u32 = 1000;

const S_ISGID: u32 = 0o2000;

#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    perm: u32,
    uid: u32,
    gid: u32,
    /// File content, or the symlink target.
    data: Vec<u8>,
    /// Directory entries.
    entries: BTreeMap<Vec<u8>, u64>,
    /// For a directory, the directory it was last linked in (`..`).
    parent: u64,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Node {
    fn new(kind: Kind, perm: u32, uid: u32, gid: u32, parent: u64) -> Node {
        Node {
            kind,
            perm,
            uid,
            gid,
            data: Vec::new(),
            entries: BTreeMap::new(),
            parent,
            xattrs: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct OpenFile {
    ino: u64,
    readable: bool,
    writable: bool,
}

#[derive(Clone, Debug)]
pub struct Model {
    nodes: BTreeMap<u64, Node>,
    /// References the kernel holds (LOOKUP and the creating calls add one, FORGET drops).
    lookups: BTreeMap<u64, u64>,
    handles: BTreeMap<u64, OpenFile>,
    next_handle: u64,
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

impl Model {
    pub fn new() -> Model {
        let mut nodes = BTreeMap::new();
        nodes.insert(ROOT, Node::new(Kind::Dir, 0o755, 0, 0, ROOT));
        Model {
            nodes,
            lookups: BTreeMap::new(),
            handles: BTreeMap::new(),
            next_handle: 1,
        }
    }

    fn node(&self, ino: u64) -> Res<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Res<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    /// The directory `ino`, or ENOTDIR.
    fn dir(&self, ino: u64) -> Res<&Node> {
        let n = self.node(ino)?;
        if n.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        Ok(n)
    }

    /// A directory new entries may go into: ENOENT once it has been removed.
    fn live_dir(&self, ino: u64) -> Res<&Node> {
        let d = self.dir(ino)?;
        if self.nlink(ino) == 0 {
            return Err(Errno::ENOENT);
        }
        Ok(d)
    }

    /// How many entries of the tree name each inode.
    fn references(&self) -> BTreeMap<u64, u32> {
        let mut refs = BTreeMap::new();
        for n in self.nodes.values() {
            for child in n.entries.values() {
                *refs.entry(*child).or_insert(0) += 1;
            }
        }
        refs
    }

    fn nlink_with(&self, refs: &BTreeMap<u64, u32>, ino: u64) -> u32 {
        let Some(n) = self.nodes.get(&ino) else {
            return 0;
        };
        let named = refs.get(&ino).copied().unwrap_or(0);
        if n.kind != Kind::Dir {
            return named;
        }
        if ino != ROOT && named == 0 {
            return 0;
        }
        let subdirs = n
            .entries
            .values()
            .filter(|c| self.nodes.get(c).is_some_and(|c| c.kind == Kind::Dir))
            .count();
        2 + subdirs as u32
    }

    fn nlink(&self, ino: u64) -> u32 {
        self.nlink_with(&self.references(), ino)
    }

    fn attr(&self, ino: u64) -> Res<Attr> {
        let n = self.node(ino)?;
        Ok(Attr {
            ino,
            kind: n.kind,
            nlink: self.nlink(ino),
            size: n.data.len() as u64,
            perm: n.perm,
            uid: n.uid,
            gid: n.gid,
        })
    }

    fn remember(&mut self, ino: u64) {
        *self.lookups.entry(ino).or_insert(0) += 1;
    }

    /// Whether `a` is `b` or one of its ancestors.
    fn is_ancestor(&self, a: u64, mut b: u64) -> bool {
        loop {
            if a == b {
                return true;
            }
            if b == ROOT {
                return false;
            }
            match self.nodes.get(&b) {
                Some(n) => b = n.parent,
                None => return false,
            }
        }
    }

    /// Drop every inode nothing refers to any more.
    fn collect(&mut self) {
        let refs = self.references();
        let open: BTreeSet<u64> = self.handles.values().map(|h| h.ino).collect();
        let dead: Vec<u64> = self
            .nodes
            .keys()
            .copied()
            .filter(|ino| {
                self.nlink_with(&refs, *ino) == 0
                    && !self.lookups.contains_key(ino)
                    && !open.contains(ino)
            })
            .collect();
        for ino in dead {
            self.nodes.remove(&ino);
        }
    }

    fn make(&mut self, parent: u64, name: &[u8], kind: Kind, mode: u32, new_ino: u64) -> Res<Attr> {
        let d = self.live_dir(parent)?;
        if d.entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let mut perm = mode & 0o7777;
        // A setgid directory passes its group on, and its setgid bit to subdirectories.
        let gid = if d.perm & S_ISGID != 0 {
            if kind == Kind::Dir {
                perm |= S_ISGID;
            }
            d.gid
        } else {
            GID
        };
        self.nodes
            .insert(new_ino, Node::new(kind, perm, UID, gid, parent));
        self.node_mut(parent)?
            .entries
            .insert(name.to_vec(), new_ino);
        self.remember(new_ino);
        self.attr(new_ino)
    }

    fn open_file(&mut self, ino: u64, flags: i32) -> Res<u64> {
        let acc = flags & libc::O_ACCMODE;
        let h = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(
            h,
            OpenFile {
                ino,
                readable: acc != libc::O_WRONLY,
                writable: acc != libc::O_RDONLY,
            },
        );
        Ok(h)
    }

    fn handle(&self, ino: u64, h: u64) -> Res<OpenFile> {
        match self.handles.get(&h) {
            Some(f) if f.ino == ino => Ok(*f),
            _ => Err(Errno::EBADF),
        }
    }

    /// The namespace rules of setxattr/removexattr: `user.` only on files and directories.
    fn check_xattr_write(&self, n: &Node, name: &[u8]) -> Res<()> {
        if name.starts_with(b"user.") {
            if !matches!(n.kind, Kind::File | Kind::Dir) {
                return Err(Errno::EPERM);
            }
            Ok(())
        } else if name.starts_with(b"trusted.") || name.starts_with(b"security.") {
            Ok(())
        } else {
            Err(Errno::EOPNOTSUPP)
        }
    }
}

impl Side for Model {
    type H = u64;

    fn tick(&mut self, _now: Timestamp) {}

    fn lookup(&mut self, parent: u64, name: &[u8]) -> Res<Attr> {
        let ino = *self.dir(parent)?.entries.get(name).ok_or(Errno::ENOENT)?;
        self.remember(ino);
        self.attr(ino)
    }

    fn forget(&mut self, ino: u64, n: u64) {
        if let Some(c) = self.lookups.get_mut(&ino) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.lookups.remove(&ino);
            }
        }
    }

    fn getattr(&mut self, ino: u64) -> Res<Attr> {
        self.attr(ino)
    }

    fn mkdir(&mut self, parent: u64, name: &[u8], mode: u32, new_ino: u64) -> Res<Attr> {
        self.make(parent, name, Kind::Dir, mode, new_ino)
    }

    fn mknod(&mut self, parent: u64, name: &[u8], mode: u32, new_ino: u64) -> Res<Attr> {
        assert_eq!(
            mode & libc::S_IFMT,
            libc::S_IFIFO,
            "the model only makes FIFOs"
        );
        self.make(parent, name, Kind::Fifo, mode, new_ino)
    }

    fn symlink(&mut self, parent: u64, name: &[u8], target: &[u8], new_ino: u64) -> Res<Attr> {
        self.make(parent, name, Kind::Symlink, 0o777, new_ino)?;
        self.node_mut(new_ino)?.data = target.to_vec();
        self.attr(new_ino)
    }

    fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        new_ino: u64,
    ) -> Res<(Attr, u64)> {
        let attr = self.make(parent, name, Kind::File, mode, new_ino)?;
        let h = self.open_file(new_ino, flags)?;
        Ok((attr, h))
    }

    fn link(&mut self, ino: u64, new_parent: u64, new_name: &[u8]) -> Res<Attr> {
        // linkat: the new name is looked up (and must not exist) before vfs_link looks at
        // the source.
        let d = self.live_dir(new_parent)?;
        if d.entries.contains_key(new_name) {
            return Err(Errno::EEXIST);
        }
        if self.node(ino)?.kind == Kind::Dir {
            return Err(Errno::EPERM);
        }
        if self.nlink(ino) == 0 {
            return Err(Errno::ENOENT);
        }
        self.node_mut(new_parent)?
            .entries
            .insert(new_name.to_vec(), ino);
        self.remember(ino);
        self.attr(ino)
    }

    fn unlink(&mut self, parent: u64, name: &[u8]) -> Res<()> {
        let ino = *self.dir(parent)?.entries.get(name).ok_or(Errno::ENOENT)?;
        if self.node(ino)?.kind == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        self.node_mut(parent)?.entries.remove(name);
        Ok(())
    }

    fn rmdir(&mut self, parent: u64, name: &[u8]) -> Res<()> {
        let ino = *self.dir(parent)?.entries.get(name).ok_or(Errno::ENOENT)?;
        let n = self.node(ino)?;
        if n.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        if !n.entries.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        self.node_mut(parent)?.entries.remove(name);
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> Res<()> {
        // do_renameat2: both parents resolve, the source must exist, the target's parent must
        // still be linked, then the flag checks, then the lock_rename "trap" checks.
        self.dir(parent)?;
        self.dir(new_parent)?;
        let src = *self.dir(parent)?.entries.get(name).ok_or(Errno::ENOENT)?;
        let dst = self.live_dir(new_parent)?.entries.get(new_name).copied();
        if flags.noreplace && dst.is_some() {
            return Err(Errno::EEXIST);
        }
        if flags.exchange && dst.is_none() {
            return Err(Errno::ENOENT);
        }
        if parent != new_parent {
            // The source may not be an ancestor of the target's parent...
            if self.is_ancestor(src, new_parent) {
                return Err(Errno::EINVAL);
            }
            // ...nor the target an ancestor of the source's parent.
            if let Some(dst) = dst {
                if self.is_ancestor(dst, parent) {
                    return Err(if flags.exchange {
                        Errno::EINVAL
                    } else {
                        Errno::ENOTEMPTY
                    });
                }
            }
        }
        if dst == Some(src) {
            // Two names of one inode (or the same name): nothing to do.
            return Ok(());
        }
        let src_kind = self.node(src)?.kind;
        if flags.exchange {
            let dst = dst.ok_or(Errno::ENOENT)?;
            self.node_mut(parent)?.entries.insert(name.to_vec(), dst);
            self.node_mut(new_parent)?
                .entries
                .insert(new_name.to_vec(), src);
            if src_kind == Kind::Dir {
                self.node_mut(src)?.parent = new_parent;
            }
            if self.node(dst)?.kind == Kind::Dir {
                self.node_mut(dst)?.parent = parent;
            }
            return Ok(());
        }
        if let Some(dst) = dst {
            let victim = self.node(dst)?;
            match (src_kind == Kind::Dir, victim.kind == Kind::Dir) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !victim.entries.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        self.node_mut(parent)?.entries.remove(name);
        self.node_mut(new_parent)?
            .entries
            .insert(new_name.to_vec(), src);
        if src_kind == Kind::Dir {
            self.node_mut(src)?.parent = new_parent;
        }
        Ok(())
    }

    fn open(&mut self, ino: u64, flags: i32) -> Res<u64> {
        let n = self.node(ino)?;
        if n.kind == Kind::Dir && flags & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(Errno::EISDIR);
        }
        self.open_file(ino, flags)
    }

    fn opendir(&mut self, ino: u64) -> Res<u64> {
        self.dir(ino)?;
        self.open_file(ino, libc::O_RDONLY)
    }

    fn release(&mut self, ino: u64, h: u64, _dir: bool) -> Res<()> {
        self.handle(ino, h)?;
        self.handles.remove(&h);
        Ok(())
    }

    fn read(&mut self, ino: u64, h: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        if !self.handle(ino, h)?.readable {
            return Err(Errno::EBADF);
        }
        let data = &self.node(ino)?.data;
        let len = data.len() as u64;
        let start = offset.min(len) as usize;
        let end = offset.saturating_add(u64::from(size)).min(len) as usize;
        Ok(data[start..end].to_vec())
    }

    fn write(&mut self, ino: u64, h: u64, offset: u64, data: &[u8]) -> Res<u32> {
        if !self.handle(ino, h)?.writable {
            return Err(Errno::EBADF);
        }
        if data.is_empty() {
            // write(2) of nothing changes nothing, even past the end of the file.
            return Ok(0);
        }
        let content = &mut self.node_mut(ino)?.data;
        let start = offset as usize;
        let end = start + data.len();
        if content.len() < end {
            content.resize(end, 0);
        }
        content[start..end].copy_from_slice(data);
        Ok(data.len() as u32)
    }

    fn truncate(&mut self, ino: u64, size: u64, fh: Option<u64>) -> Res<Attr> {
        match self.node(ino)?.kind {
            Kind::File => {}
            Kind::Dir => return Err(Errno::EISDIR),
            _ => return Err(Errno::EINVAL),
        }
        if let Some(h) = fh {
            if !self.handle(ino, h)?.writable {
                return Err(Errno::EBADF);
            }
        }
        self.node_mut(ino)?.data.resize(size as usize, 0);
        self.attr(ino)
    }

    fn fallocate(&mut self, ino: u64, h: u64, offset: u64, len: u64, mode: i32) -> Res<()> {
        use spoolfs_core::fs::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE};
        if !self.handle(ino, h)?.writable {
            return Err(Errno::EBADF);
        }
        let content = &mut self.node_mut(ino)?.data;
        let end = (offset + len) as usize;
        if mode & FALLOC_FL_PUNCH_HOLE != 0 {
            // Zeroes the range inside the file; never changes the size.
            let start = (offset as usize).min(content.len());
            let end = end.min(content.len());
            content[start..end].fill(0);
        } else if mode & FALLOC_FL_KEEP_SIZE == 0 && end > content.len() {
            content.resize(end, 0);
        }
        Ok(())
    }

    fn readdir(&mut self, ino: u64, h: u64) -> Res<Vec<(Vec<u8>, u64, Kind)>> {
        self.handle(ino, h)?;
        let d = self.dir(ino)?;
        let mut out = vec![
            (b".".to_vec(), ino, Kind::Dir),
            (b"..".to_vec(), d.parent, Kind::Dir),
        ];
        for (name, child) in &d.entries {
            out.push((name.clone(), *child, self.node(*child)?.kind));
        }
        Ok(out)
    }

    fn readlink(&mut self, ino: u64) -> Res<Vec<u8>> {
        let n = self.node(ino)?;
        if n.kind != Kind::Symlink {
            return Err(Errno::EINVAL);
        }
        Ok(n.data.clone())
    }

    fn setxattr(&mut self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Res<()> {
        use spoolfs_core::fs::{XATTR_CREATE, XATTR_REPLACE};
        let n = self.node(ino)?;
        self.check_xattr_write(n, name)?;
        let exists = n.xattrs.contains_key(name);
        if flags & XATTR_CREATE != 0 && exists {
            return Err(Errno::EEXIST);
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return Err(Errno::ENODATA);
        }
        self.node_mut(ino)?
            .xattrs
            .insert(name.to_vec(), value.to_vec());
        Ok(())
    }

    fn getxattr(&mut self, ino: u64, name: &[u8]) -> Res<Vec<u8>> {
        let n = self.node(ino)?;
        if !(name.starts_with(b"user.")
            || name.starts_with(b"trusted.")
            || name.starts_with(b"security."))
        {
            return Err(Errno::EOPNOTSUPP);
        }
        n.xattrs.get(name).cloned().ok_or(Errno::ENODATA)
    }

    fn listxattr(&mut self, ino: u64) -> Res<Vec<u8>> {
        let n = self.node(ino)?;
        let mut out = Vec::new();
        for name in n.xattrs.keys() {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    fn removexattr(&mut self, ino: u64, name: &[u8]) -> Res<()> {
        let n = self.node(ino)?;
        self.check_xattr_write(n, name)?;
        if !n.xattrs.contains_key(name) {
            return Err(Errno::ENODATA);
        }
        self.node_mut(ino)?.xattrs.remove(name);
        Ok(())
    }

    fn tree(&mut self) -> Vec<(Vec<Vec<u8>>, Kind)> {
        fn walk(
            m: &Model,
            ino: u64,
            prefix: &mut Vec<Vec<u8>>,
            out: &mut Vec<(Vec<Vec<u8>>, Kind)>,
        ) {
            let Some(n) = m.nodes.get(&ino) else { return };
            for (name, child) in &n.entries {
                let kind = m.nodes.get(child).map_or(Kind::File, |c| c.kind);
                prefix.push(name.clone());
                out.push((prefix.clone(), kind));
                if kind == Kind::Dir {
                    walk(m, *child, prefix, out);
                }
                prefix.pop();
            }
        }
        let mut out = Vec::new();
        walk(self, ROOT, &mut Vec::new(), &mut out);
        out
    }

    fn restart(&mut self) {
        self.lookups.clear();
        self.handles.clear();
        self.collect();
    }

    fn snapshot(&mut self, contents: Contents<'_>) -> Result<Snapshot, String> {
        self.collect();
        let refs = self.references();
        let mut s = Snapshot {
            open_handles: self.handles.len(),
            known_inodes: self.lookups.len(),
            ..Snapshot::default()
        };
        for (ino, n) in &self.nodes {
            let nlink = self.nlink_with(&refs, *ino);
            s.nodes.insert(
                *ino,
                NodeView {
                    kind: n.kind,
                    nlink,
                    size: n.data.len() as u64,
                    perm: n.perm,
                    uid: n.uid,
                    gid: n.gid,
                    parent: if n.kind == Kind::Dir { n.parent } else { 0 },
                },
            );
            if nlink == 0 {
                s.orphans.insert(*ino);
            }
            for (name, child) in &n.entries {
                let kind = self.nodes.get(child).map_or(Kind::File, |c| c.kind);
                s.dentries.insert((*ino, name.clone()), (*child, kind));
            }
            if n.kind == Kind::Symlink {
                s.symlinks.insert(*ino, n.data.clone());
            }
            for (name, value) in &n.xattrs {
                s.xattrs.insert((*ino, name.clone()), value.clone());
            }
            if n.kind == Kind::File && contents.wants(*ino) {
                s.contents.insert(*ino, n.data.clone());
            }
        }
        Ok(s)
    }
}
