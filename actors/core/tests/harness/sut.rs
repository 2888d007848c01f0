//! The system under test: `spoolfs_core::Fs` over a store, behind the [`Side`] trait.

use std::collections::{BTreeMap, BTreeSet};

use spoolfs_core::{
    Ctx, Dentry, Fh, Fs, Ino, Inode, Kind, MemStore, RenameFlags, SetAttr, Store, Timestamp,
    CHUNK_SIZE,
};

use super::model::{GID, UID};
use super::{Attr, Contents, NodeView, Res, Side, Snapshot};

/// Every record of a store, for whole-state comparisons and invariant checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawDump {
    pub inodes: BTreeMap<u64, Inode>,
    pub dentries: BTreeMap<(u64, Vec<u8>), Dentry>,
    pub symlinks: BTreeMap<u64, Vec<u8>>,
    pub xattrs: BTreeMap<(u64, Vec<u8>), Vec<u8>>,
    pub chunks: BTreeMap<(u64, u64), Vec<u8>>,
    pub orphans: BTreeSet<u64>,
}

impl RawDump {
    /// Storage invariants no snapshot comparison would show: nothing hangs off a missing
    /// inode, content only for regular files and never at or past the file size (so growing
    /// a file needs no zeroing), every entry agrees with its inode.
    pub fn check(&self) -> Result<(), String> {
        for ((ino, idx), bytes) in &self.chunks {
            let Some(inode) = self.inodes.get(ino) else {
                return Err(format!("chunk ({ino}, {idx}) of a missing inode"));
            };
            if inode.kind != Kind::File {
                return Err(format!("chunk ({ino}, {idx}) of a {:?}", inode.kind));
            }
            if bytes.len() as u64 > CHUNK_SIZE {
                return Err(format!("chunk ({ino}, {idx}) holds {} bytes", bytes.len()));
            }
            let end = idx * CHUNK_SIZE + bytes.len() as u64;
            if end > inode.size {
                return Err(format!(
                    "chunk ({ino}, {idx}) stores bytes up to {end}, past the size {}",
                    inode.size
                ));
            }
        }
        for ino in self.symlinks.keys() {
            if self.inodes.get(ino).map(|i| i.kind) != Some(Kind::Symlink) {
                return Err(format!("symlink target of {ino}, which is not a symlink"));
            }
        }
        for (ino, name) in self.xattrs.keys() {
            if !self.inodes.contains_key(ino) {
                return Err(format!("xattr {:?} of missing inode {ino}", bstr(name)));
            }
        }
        for ((parent, name), d) in &self.dentries {
            match self.inodes.get(parent) {
                Some(p) if p.kind == Kind::Dir && p.nlink > 0 => {}
                other => {
                    return Err(format!(
                        "entry {:?} in {parent}, which is {other:?}",
                        bstr(name)
                    ))
                }
            }
            match self.inodes.get(&d.ino.0) {
                Some(i) if i.kind == d.kind => {}
                other => {
                    return Err(format!(
                        "entry {:?} in {parent} -> {d:?}, inode {other:?}",
                        bstr(name)
                    ))
                }
            }
        }
        for ino in &self.orphans {
            match self.inodes.get(ino) {
                Some(i) if i.nlink == 0 => {}
                other => return Err(format!("orphan {ino} is {other:?}")),
            }
        }
        Ok(())
    }

    /// The content of file `ino` as its chunks spell it (holes read as zero).
    pub fn content(&self, ino: u64) -> Vec<u8> {
        let size = self.inodes.get(&ino).map_or(0, |i| i.size) as usize;
        let mut out = vec![0u8; size];
        for ((_, idx), bytes) in self.chunks.range((ino, 0)..=(ino, u64::MAX)) {
            let start = (idx * CHUNK_SIZE) as usize;
            let end = (start + bytes.len()).min(size);
            if start < end {
                out[start..end].copy_from_slice(&bytes[..end - start]);
            }
        }
        out
    }
}

pub fn bstr(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Where the store lives: a `MemStore`, or (in the store crate) redb tables that exist only
/// inside a write transaction, hence the closure.
pub trait Backend {
    type S<'a>: Store
    where
        Self: 'a;
    fn with<R>(&mut self, f: impl for<'a> FnOnce(&mut Self::S<'a>) -> R) -> R;
    fn dump(&mut self) -> RawDump;
    /// Called after every operation.
    fn op_done(&mut self, _index: usize) {}
    /// The daemon restarts (the redb backend commits and reopens its database).
    fn restart(&mut self) {}
}

pub fn dump_mem(m: &MemStore) -> RawDump {
    RawDump {
        inodes: m.inodes.iter().map(|(k, v)| (k.0, v.clone())).collect(),
        dentries: m
            .dentries
            .iter()
            .map(|((p, n), d)| ((p.0, n.clone()), *d))
            .collect(),
        symlinks: m.symlinks.iter().map(|(k, v)| (k.0, v.clone())).collect(),
        xattrs: m
            .xattrs
            .iter()
            .map(|((i, n), v)| ((i.0, n.clone()), v.clone()))
            .collect(),
        chunks: m
            .chunks
            .iter()
            .map(|((i, idx), v)| ((i.0, *idx), v.clone()))
            .collect(),
        orphans: m.orphans.iter().map(|i| i.0).collect(),
    }
}

impl Backend for MemStore {
    type S<'a> = MemStore;
    fn with<R>(&mut self, f: impl for<'a> FnOnce(&mut MemStore) -> R) -> R {
        f(self)
    }
    fn dump(&mut self) -> RawDump {
        dump_mem(self)
    }
}

pub struct Sut<B: Backend> {
    pub fs: Fs,
    pub backend: B,
    pub ctx: Ctx,
}

fn attr(i: &Inode) -> Attr {
    Attr {
        ino: i.ino.0,
        kind: i.kind,
        nlink: i.nlink,
        size: i.size,
        perm: i.perm,
        uid: i.uid,
        gid: i.gid,
    }
}

impl<B: Backend> Sut<B> {
    /// A filesystem with a fresh root (0:0, 0755) in `backend`.
    pub fn new(mut backend: B) -> Sut<B> {
        let mut fs = Fs::default();
        let root_ctx = Ctx {
            uid: 0,
            gid: 0,
            pid: 1,
            now: Timestamp::new(1, 0),
        };
        backend
            .with(|s| fs.init_root(s, &root_ctx, 0o755))
            .expect("init_root");
        Sut {
            fs,
            backend,
            ctx: Ctx {
                uid: UID,
                gid: GID,
                pid: 42,
                now: Timestamp::new(1, 0),
            },
        }
    }
}

impl<B: Backend> Side for Sut<B> {
    type H = Fh;

    fn tick(&mut self, now: Timestamp) {
        self.ctx.now = now;
    }

    fn lookup(&mut self, parent: u64, name: &[u8]) -> Res<Attr> {
        let fs = &mut self.fs;
        self.backend
            .with(|s| fs.lookup(s, Ino(parent), name))
            .map(|i| attr(&i))
    }

    fn forget(&mut self, ino: u64, n: u64) {
        let fs = &mut self.fs;
        self.backend
            .with(|s| fs.forget(s, Ino(ino), n))
            .expect("forget");
    }

    fn getattr(&mut self, ino: u64) -> Res<Attr> {
        let fs = &mut self.fs;
        self.backend
            .with(|s| fs.getattr(s, Ino(ino)))
            .map(|i| attr(&i))
    }

    fn mkdir(&mut self, parent: u64, name: &[u8], mode: u32, new_ino: u64) -> Res<Attr> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        self.backend
            .with(|s| fs.mkdir(s, ctx, Ino(parent), name, mode, Ino(new_ino)))
            .map(|i| attr(&i))
    }

    fn mknod(&mut self, parent: u64, name: &[u8], mode: u32, new_ino: u64) -> Res<Attr> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        self.backend
            .with(|s| fs.mknod(s, ctx, Ino(parent), name, mode, 0, Ino(new_ino)))
            .map(|i| attr(&i))
    }

    fn symlink(&mut self, parent: u64, name: &[u8], target: &[u8], new_ino: u64) -> Res<Attr> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        self.backend
            .with(|s| fs.symlink(s, ctx, Ino(parent), name, target, Ino(new_ino)))
            .map(|i| attr(&i))
    }

    fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
        new_ino: u64,
    ) -> Res<(Attr, Fh)> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        self.backend
            .with(|s| fs.create(s, ctx, Ino(parent), name, mode, flags, Ino(new_ino)))
            .map(|(i, fh)| (attr(&i), fh))
    }

    fn link(&mut self, ino: u64, new_parent: u64, new_name: &[u8]) -> Res<Attr> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        self.backend
            .with(|s| fs.link(s, ctx, Ino(ino), Ino(new_parent), new_name))
            .map(|i| attr(&i))
    }

    fn unlink(&mut self, parent: u64, name: &[u8]) -> Res<()> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        self.backend.with(|s| fs.unlink(s, ctx, Ino(parent), name))
    }

    fn rmdir(&mut self, parent: u64, name: &[u8]) -> Res<()> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        self.backend.with(|s| fs.rmdir(s, ctx, Ino(parent), name))
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        flags: RenameFlags,
    ) -> Res<()> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        self.backend
            .with(|s| fs.rename(s, ctx, Ino(parent), name, Ino(new_parent), new_name, flags))
    }

    fn open(&mut self, ino: u64, flags: i32) -> Res<Fh> {
        let fs = &mut self.fs;
        self.backend.with(|s| fs.open(s, Ino(ino), flags))
    }

    fn opendir(&mut self, ino: u64) -> Res<Fh> {
        let fs = &mut self.fs;
        self.backend.with(|s| fs.opendir(s, Ino(ino)))
    }

    fn release(&mut self, ino: u64, h: Fh, dir: bool) -> Res<()> {
        let fs = &mut self.fs;
        self.backend.with(|s| {
            if dir {
                fs.releasedir(s, Ino(ino), h)
            } else {
                fs.flush(s, Ino(ino), h)?;
                fs.release(s, Ino(ino), h)
            }
        })
    }

    fn read(&mut self, ino: u64, h: Fh, offset: u64, size: u32) -> Res<Vec<u8>> {
        let fs = &mut self.fs;
        self.backend.with(|s| fs.read(s, Ino(ino), h, offset, size))
    }

    fn write(&mut self, ino: u64, h: Fh, offset: u64, data: &[u8]) -> Res<u32> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        self.backend
            .with(|s| fs.write(s, ctx, Ino(ino), h, offset, data))
    }

    fn truncate(&mut self, ino: u64, size: u64, fh: Option<Fh>) -> Res<Attr> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        let set = SetAttr {
            size: Some(size),
            fh,
            ..SetAttr::default()
        };
        self.backend
            .with(|s| fs.setattr(s, ctx, Ino(ino), &set))
            .map(|i| attr(&i))
    }

    fn fallocate(&mut self, ino: u64, h: Fh, offset: u64, len: u64, mode: i32) -> Res<()> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        self.backend
            .with(|s| fs.fallocate(s, ctx, Ino(ino), h, offset, len, mode))
    }

    fn readdir(&mut self, ino: u64, h: Fh) -> Res<Vec<(Vec<u8>, u64, Kind)>> {
        let fs = &mut self.fs;
        let entries = self.backend.with(|s| fs.readdir(s, Ino(ino), h, 0))?;
        let mut out = Vec::new();
        for (i, (cookie, e)) in entries.into_iter().enumerate() {
            // Cookies are positions + 1: a later readdir resumes right after the entry.
            assert_eq!(cookie, i as u64 + 1, "readdir cookie");
            out.push((e.name, e.ino.0, e.kind));
        }
        Ok(out)
    }

    fn readlink(&mut self, ino: u64) -> Res<Vec<u8>> {
        let fs = &mut self.fs;
        self.backend.with(|s| fs.readlink(s, Ino(ino)))
    }

    fn setxattr(&mut self, ino: u64, name: &[u8], value: &[u8], flags: i32) -> Res<()> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        self.backend
            .with(|s| fs.setxattr(s, ctx, Ino(ino), name, value, flags))
    }

    fn getxattr(&mut self, ino: u64, name: &[u8]) -> Res<Vec<u8>> {
        let fs = &mut self.fs;
        self.backend.with(|s| fs.getxattr(s, Ino(ino), name))
    }

    fn listxattr(&mut self, ino: u64) -> Res<Vec<u8>> {
        let fs = &mut self.fs;
        self.backend.with(|s| fs.listxattr(s, Ino(ino)))
    }

    fn removexattr(&mut self, ino: u64, name: &[u8]) -> Res<()> {
        let (fs, ctx) = (&mut self.fs, &self.ctx);
        self.backend
            .with(|s| fs.removexattr(s, ctx, Ino(ino), name))
    }

    fn tree(&mut self) -> Vec<(Vec<Vec<u8>>, Kind)> {
        fn walk(
            s: &mut impl Store,
            dir: Ino,
            prefix: &mut Vec<Vec<u8>>,
            out: &mut Vec<(Vec<Vec<u8>>, Kind)>,
        ) {
            let entries = s.dentries(dir, None, usize::MAX).expect("dentries");
            for (name, d) in entries {
                prefix.push(name);
                out.push((prefix.clone(), d.kind));
                if d.kind == Kind::Dir {
                    walk(s, d.ino, prefix, out);
                }
                prefix.pop();
            }
        }
        let mut out = Vec::new();
        self.backend
            .with(|s| walk(s, Ino::ROOT, &mut Vec::new(), &mut out));
        out
    }

    fn restart(&mut self) {
        self.backend.restart();
        self.fs = Fs::new(self.fs.limits);
        let fs = &mut self.fs;
        self.backend
            .with(|s| fs.reclaim_orphans(s))
            .expect("reclaim_orphans");
    }

    fn op_done(&mut self, index: usize) {
        self.backend.op_done(index);
    }

    fn snapshot(&mut self, contents: Contents<'_>) -> Result<Snapshot, String> {
        let raw = self.backend.dump();
        raw.check()?;
        let mut s = Snapshot {
            open_handles: self.fs.open_handles(),
            known_inodes: self.fs.known_inodes(),
            symlinks: raw.symlinks.clone(),
            xattrs: raw.xattrs.clone(),
            orphans: raw.orphans.clone(),
            ..Snapshot::default()
        };
        for (ino, i) in &raw.inodes {
            s.nodes.insert(
                *ino,
                NodeView {
                    kind: i.kind,
                    nlink: i.nlink,
                    size: i.size,
                    perm: i.perm,
                    uid: i.uid,
                    gid: i.gid,
                    parent: if i.kind == Kind::Dir { i.parent.0 } else { 0 },
                },
            );
            if i.kind == Kind::File && contents.wants(*ino) {
                s.contents.insert(*ino, raw.content(*ino));
            }
        }
        for ((parent, name), d) in &raw.dentries {
            s.dentries
                .insert((*parent, name.clone()), (d.ino.0, d.kind));
        }
        Ok(s)
    }
}
