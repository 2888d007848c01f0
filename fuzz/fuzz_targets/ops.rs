//! Arbitrary operation sequences through `spoolfs_core::Fs` over `MemStore`.
//!
//! The target plays the kernel the way the model test's driver does (it counts the lookups it
//! holds and forgets only those, keeps the open handles, releases everything at the end), but
//! it takes every argument from the fuzzer, names and offsets included, so it also reaches the
//! edge cases a model test's generator avoids. After every operation the whole store must pass
//! an fsck-like check:
//!
//! - every entry has a valid name, lives in a live directory and points to an inode of its kind;
//! - link counts: a file's equals its entries, a directory's is 2 + its subdirectories, a
//!   directory has one entry and it is in the directory its `parent` names, and walking
//!   `parent` pointers reaches the root;
//! - an inode without entries has nlink 0 and is in the orphan table exactly while something
//!   still refers to it (a kernel lookup or an open handle); nothing else has nlink 0;
//! - content, xattrs and symlink targets belong to live inodes of the right kind; no content
//!   at or past a file's size; every symlink has its target.
//!
//! At the end every handle is released and every lookup forgotten: nothing may be left
//! unlinked, and a restart must find no orphans.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use spoolfs_core::fs::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, XATTR_CREATE, XATTR_REPLACE};
use spoolfs_core::{
    Ctx, Fh, Fs, Ino, Kind, MemStore, RenameFlags, SetAttr, SetTime, Timestamp, CHUNK_SIZE,
    PERM_MASK,
};

/// An inode: the `n`-th (modulo their number) of the kind the call wants, or of any kind,
/// the inode of an open handle, or any number at all.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Target {
    Kind(u8),
    Any(u8),
    Handle(u8),
    Raw(u64),
}

/// A name: mostly from a small alphabet so names collide; the special and invalid ones too.
#[derive(Arbitrary, Debug, Clone)]
enum Name {
    Short(u8),
    Dot,
    DotDot,
    Empty,
    Slash,
    Nul,
    /// 250 to 259 bytes, around the 255-byte limit.
    Long(u8),
    Bytes(Vec<u8>),
}

impl Name {
    fn bytes(&self) -> Vec<u8> {
        const NAMES: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];
        match self {
            Name::Short(i) => NAMES[usize::from(*i) % NAMES.len()].to_vec(),
            Name::Dot => b".".to_vec(),
            Name::DotDot => b"..".to_vec(),
            Name::Empty => Vec::new(),
            Name::Slash => b"a/b".to_vec(),
            Name::Nul => b"a\0b".to_vec(),
            Name::Long(n) => vec![b'x'; 250 + usize::from(*n % 10)],
            Name::Bytes(b) => b.iter().take(300).copied().collect(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum LinkTarget {
    Short(u8),
    Empty,
    /// 4090 to 4099 bytes, around the 4095-byte limit.
    Long(u8),
    Bytes(Vec<u8>),
}

impl LinkTarget {
    fn bytes(&self) -> Vec<u8> {
        match self {
            LinkTarget::Short(i) => {
                [b"a".as_slice(), b"../b/c", b"/x/y"][usize::from(*i) % 3].to_vec()
            }
            LinkTarget::Empty => Vec::new(),
            LinkTarget::Long(n) => vec![b'y'; 4090 + usize::from(*n % 10)],
            LinkTarget::Bytes(b) => b.iter().take(200).copied().collect(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum XName {
    Known(u8),
    /// 250 to 259 bytes with a `user.` prefix, around the 255-byte limit.
    Long(u8),
    Bytes(Vec<u8>),
}

impl XName {
    fn bytes(&self) -> Vec<u8> {
        const NAMES: [&[u8]; 7] = [
            b"user.x",
            b"user.y",
            b"trusted.t",
            b"security.s",
            b"os2.z",
            b"system.posix_acl_access",
            b"user.",
        ];
        match self {
            XName::Known(i) => NAMES[usize::from(*i) % NAMES.len()].to_vec(),
            XName::Long(n) => {
                let mut v = b"user.".to_vec();
                v.resize(250 + usize::from(*n % 10), b'z');
                v
            }
            XName::Bytes(b) => b.iter().take(300).copied().collect(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum XValue {
    Bytes(Vec<u8>),
    /// 65530 to 65539 bytes, around the 64 KiB limit.
    Big(u8),
}

impl XValue {
    fn bytes(&self) -> Vec<u8> {
        match self {
            XValue::Bytes(b) => b.iter().take(512).copied().collect(),
            XValue::Big(n) => vec![7; 65530 + usize::from(*n % 10)],
        }
    }
}

/// An offset or size: small, near a chunk boundary, near the 16 TiB limit, or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Off {
    Small(u16),
    Chunk(u8, i16),
    Limit(i16),
    Any(u64),
}

impl Off {
    fn get(self) -> u64 {
        match self {
            Off::Small(n) => u64::from(n),
            Off::Chunk(k, d) => (u64::from(k % 8) * CHUNK_SIZE).saturating_add_signed(i64::from(d)),
            Off::Limit(d) => (1u64 << 44).saturating_add_signed(i64::from(d)),
            Off::Any(n) => n,
        }
    }
}

/// A read or write length, at most about 2.5 chunks (FUSE's requests are smaller still).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    Small(u8),
    Medium(u16),
    Large(u8),
}

impl Len {
    fn get(self) -> u32 {
        match self {
            Len::Small(n) => u32::from(n),
            Len::Medium(n) => u32::from(n),
            Len::Large(n) => 60_000 + u32::from(n) * 400,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Lookup {
        dir: Target,
        name: Name,
    },
    Getattr {
        t: Target,
    },
    Setattr {
        t: Target,
        mode: Option<u16>,
        uid: Option<u8>,
        gid: Option<u8>,
        size: Option<Off>,
        atime: Option<bool>,
        mtime: Option<bool>,
        fh: Option<u8>,
    },
    Mkdir {
        dir: Target,
        name: Name,
        mode: u16,
    },
    Mknod {
        dir: Target,
        name: Name,
        mode: u32,
        rdev: u32,
    },
    Symlink {
        dir: Target,
        name: Name,
        target: LinkTarget,
    },
    Create {
        dir: Target,
        name: Name,
        mode: u16,
        acc: u8,
    },
    Link {
        src: Target,
        dir: Target,
        name: Name,
    },
    Unlink {
        dir: Target,
        name: Name,
    },
    Rmdir {
        dir: Target,
        name: Name,
    },
    Rename {
        dir: Target,
        name: Name,
        to: Target,
        to_name: Name,
        flags: u8,
    },
    Open {
        t: Target,
        acc: u8,
    },
    Opendir {
        t: Target,
    },
    Read {
        h: u8,
        off: Off,
        len: Len,
    },
    Write {
        h: u8,
        off: Off,
        len: Len,
        seed: u8,
    },
    Flush {
        h: u8,
    },
    Release {
        h: u8,
    },
    Readdir {
        h: u8,
        offset: u8,
        plus: bool,
    },
    Fallocate {
        h: u8,
        off: Off,
        len: Off,
        mode: u8,
    },
    Lseek {
        h: u8,
        off: Off,
        whence: u8,
    },
    Setxattr {
        t: Target,
        name: XName,
        value: XValue,
        flags: u8,
    },
    Getxattr {
        t: Target,
        name: XName,
    },
    Listxattr {
        t: Target,
    },
    Removexattr {
        t: Target,
        name: XName,
    },
    Readlink {
        t: Target,
    },
    Access {
        t: Target,
        mask: u8,
        root: bool,
    },
    Forget {
        t: Target,
        n: u8,
    },
    ForgetAll,
    Restart,
}

/// What the kernel holds: lookup counts and open handles.
struct Kernel {
    fs: Fs,
    store: MemStore,
    lookups: BTreeMap<Ino, u64>,
    handles: Vec<(Fh, Ino)>,
    ctx: Ctx,
    /// The next inode number to hand out: like the runtime's counter, never reused.
    next_ino: u64,
}

/// Which kind of inode a `Target::Kind` picks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Dir,
    File,
    NonDir,
    Any,
}

impl Kernel {
    fn new() -> Kernel {
        let mut fs = Fs::default();
        let mut store = MemStore::default();
        let root = Ctx {
            uid: 0,
            gid: 0,
            pid: 1,
            now: Timestamp::new(1, 0),
        };
        if let Err(e) = fs.init_root(&mut store, &root, 0o755) {
            panic!("init_root: {e}");
        }
        Kernel {
            fs,
            store,
            lookups: BTreeMap::new(),
            handles: Vec::new(),
            ctx: Ctx {
                uid: 1000,
                gid: 1000,
                pid: 42,
                now: Timestamp::new(1, 0),
            },
            next_ino: 2,
        }
    }

    fn pick(&self, t: Target, want: Want) -> Ino {
        let matching = |k: Kind| match want {
            Want::Dir => k == Kind::Dir,
            Want::File => k == Kind::File,
            Want::NonDir => k != Kind::Dir,
            Want::Any => true,
        };
        let nth = |inos: Vec<Ino>, i: u8| {
            if inos.is_empty() {
                Ino::ROOT
            } else {
                inos[usize::from(i) % inos.len()]
            }
        };
        match t {
            Target::Kind(i) => nth(
                self.store
                    .inodes
                    .values()
                    .filter(|n| matching(n.kind))
                    .map(|n| n.ino)
                    .collect(),
                i,
            ),
            Target::Any(i) => nth(self.store.inodes.keys().copied().collect(), i),
            Target::Handle(h) => self.handle(h).map_or(Ino::ROOT, |(_, ino)| ino),
            Target::Raw(n) => Ino(n),
        }
    }

    /// The `h`-th open handle, or none (then a handle number nobody has is used).
    fn handle(&self, h: u8) -> Option<(Fh, Ino)> {
        if self.handles.is_empty() || h == u8::MAX {
            None
        } else {
            Some(self.handles[usize::from(h) % self.handles.len()])
        }
    }

    fn handle_or_bogus(&self, h: u8) -> (Fh, Ino) {
        self.handle(h).unwrap_or((Fh(u64::MAX), Ino::ROOT))
    }

    fn hold(&mut self, ino: Ino) {
        *self.lookups.entry(ino).or_insert(0) += 1;
    }

    fn forget(&mut self, ino: Ino, n: u64) {
        let Some(held) = self.lookups.get_mut(&ino) else {
            return;
        };
        let n = n.min(*held);
        *held -= n;
        if *held == 0 {
            self.lookups.remove(&ino);
        }
        if let Err(e) = self.fs.forget(&mut self.store, ino, n) {
            panic!("forget({ino}, {n}): {e}");
        }
    }

    fn forget_all(&mut self) {
        let held: Vec<(Ino, u64)> = self.lookups.iter().map(|(i, n)| (*i, *n)).collect();
        for (ino, n) in held {
            self.forget(ino, n);
        }
    }

    fn release_at(&mut self, i: usize) {
        let (fh, ino) = self.handles.remove(i);
        let s = &mut self.store;
        // FLUSH then RELEASE, as the kernel sends them; both must succeed for a live handle.
        if let Err(e) = self.fs.flush(s, ino, fh) {
            panic!("flush of open handle {fh:?}: {e}");
        }
        if let Err(e) = self.fs.release(s, ino, fh) {
            panic!("release of open handle {fh:?}: {e}");
        }
    }

    fn restart(&mut self) {
        self.fs = Fs::new(self.fs.limits);
        self.lookups.clear();
        self.handles.clear();
        if let Err(e) = self.fs.reclaim_orphans(&mut self.store) {
            panic!("reclaim_orphans: {e}");
        }
    }

    fn apply(&mut self, op: &Op) {
        self.ctx.now.secs += 1;
        let ctx = self.ctx;
        match op {
            Op::Lookup { dir, name } => {
                let dir = self.pick(*dir, Want::Dir);
                if let Ok(i) = self.fs.lookup(&mut self.store, dir, &name.bytes()) {
                    self.hold(i.ino);
                }
            }
            Op::Getattr { t } => {
                let ino = self.pick(*t, Want::Any);
                if let Ok(i) = self.fs.getattr(&mut self.store, ino) {
                    assert_eq!(i.ino, ino);
                }
            }
            Op::Setattr {
                t,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
                fh,
            } => {
                let ino = self.pick(*t, Want::File);
                let time = |t: &Option<bool>| {
                    t.map(|now| {
                        if now {
                            SetTime::Now
                        } else {
                            SetTime::At(Timestamp::new(7, 8))
                        }
                    })
                };
                let set = SetAttr {
                    mode: mode.map(u32::from),
                    uid: uid.map(u32::from),
                    gid: gid.map(u32::from),
                    size: size.map(Off::get),
                    atime: time(atime),
                    mtime: time(mtime),
                    ctime: None,
                    fh: fh.map(|h| self.handle_or_bogus(h).0),
                };
                if let Ok(i) = self.fs.setattr(&mut self.store, &ctx, ino, &set) {
                    if let Some(size) = set.size {
                        assert_eq!(i.size, size, "setattr size");
                    }
                }
            }
            Op::Mkdir { dir, name, mode } => {
                let dir = self.pick(*dir, Want::Dir);
                let ino = self.new_ino();
                let r = self.fs.mkdir(
                    &mut self.store,
                    &ctx,
                    dir,
                    &name.bytes(),
                    u32::from(*mode),
                    ino,
                );
                if let Ok(i) = r {
                    self.hold(i.ino);
                }
            }
            Op::Mknod {
                dir,
                name,
                mode,
                rdev,
            } => {
                let dir = self.pick(*dir, Want::Dir);
                let ino = self.new_ino();
                let r = self
                    .fs
                    .mknod(&mut self.store, &ctx, dir, &name.bytes(), *mode, *rdev, ino);
                if let Ok(i) = r {
                    self.hold(i.ino);
                }
            }
            Op::Symlink { dir, name, target } => {
                let dir = self.pick(*dir, Want::Dir);
                let ino = self.new_ino();
                let target = target.bytes();
                let r = self
                    .fs
                    .symlink(&mut self.store, &ctx, dir, &name.bytes(), &target, ino);
                if let Ok(i) = r {
                    self.hold(i.ino);
                    match self.fs.readlink(&mut self.store, i.ino) {
                        Ok(t) => assert_eq!(t, target, "readlink after symlink"),
                        Err(e) => panic!("readlink of a new symlink: {e}"),
                    }
                }
            }
            Op::Create {
                dir,
                name,
                mode,
                acc,
            } => {
                let dir = self.pick(*dir, Want::Dir);
                let ino = self.new_ino();
                let flags = acc_flags(*acc) | libc::O_CREAT;
                let r = self.fs.create(
                    &mut self.store,
                    &ctx,
                    dir,
                    &name.bytes(),
                    u32::from(*mode),
                    flags,
                    ino,
                );
                if let Ok((i, fh)) = r {
                    self.hold(i.ino);
                    self.handles.push((fh, i.ino));
                }
            }
            Op::Link { src, dir, name } => {
                let src = self.pick(*src, Want::NonDir);
                let dir = self.pick(*dir, Want::Dir);
                if let Ok(i) = self.fs.link(&mut self.store, &ctx, src, dir, &name.bytes()) {
                    self.hold(i.ino);
                }
            }
            Op::Unlink { dir, name } => {
                let dir = self.pick(*dir, Want::Dir);
                let _ = self.fs.unlink(&mut self.store, &ctx, dir, &name.bytes());
            }
            Op::Rmdir { dir, name } => {
                let dir = self.pick(*dir, Want::Dir);
                let _ = self.fs.rmdir(&mut self.store, &ctx, dir, &name.bytes());
            }
            Op::Rename {
                dir,
                name,
                to,
                to_name,
                flags,
            } => {
                let dir = self.pick(*dir, Want::Dir);
                let to = self.pick(*to, Want::Dir);
                let flags = RenameFlags {
                    noreplace: flags & 1 != 0,
                    exchange: flags & 2 != 0,
                };
                let _ = self.fs.rename(
                    &mut self.store,
                    &ctx,
                    dir,
                    &name.bytes(),
                    to,
                    &to_name.bytes(),
                    flags,
                );
            }
            Op::Open { t, acc } => {
                let ino = self.pick(*t, Want::File);
                if let Ok(fh) = self.fs.open(&mut self.store, ino, acc_flags(*acc)) {
                    self.handles.push((fh, ino));
                }
            }
            Op::Opendir { t } => {
                let ino = self.pick(*t, Want::Dir);
                if let Ok(fh) = self.fs.opendir(&mut self.store, ino) {
                    self.handles.push((fh, ino));
                }
            }
            Op::Read { h, off, len } => {
                let (fh, ino) = self.handle_or_bogus(*h);
                let (off, len) = (off.get(), len.get());
                if let Ok(data) = self.fs.read(&mut self.store, ino, fh, off, len) {
                    let size = self.store.inodes.get(&ino).map_or(0, |i| i.size);
                    assert!(
                        data.len() as u64 <= u64::from(len),
                        "read returned too much"
                    );
                    assert!(
                        data.is_empty() || off + data.len() as u64 <= size,
                        "read past the end of the file"
                    );
                }
            }
            Op::Write { h, off, len, seed } => {
                let (fh, ino) = self.handle_or_bogus(*h);
                let off = off.get();
                let data: Vec<u8> = (0..len.get() as usize)
                    .map(|i| 1 + ((usize::from(*seed) * 7 + i) % 255) as u8)
                    .collect();
                if let Ok(n) = self.fs.write(&mut self.store, &ctx, ino, fh, off, &data) {
                    assert_eq!(n as usize, data.len(), "short write");
                    if !data.is_empty() {
                        // What was written reads back through a readable handle.
                        let back = self.fs.read(&mut self.store, ino, fh, off, n);
                        if let Ok(back) = back {
                            assert_eq!(back, data, "read after write");
                        }
                    }
                }
            }
            Op::Flush { h } => {
                let (fh, ino) = self.handle_or_bogus(*h);
                let r = self.fs.flush(&mut self.store, ino, fh);
                if self.handle(*h).is_some() {
                    assert!(r.is_ok(), "flush of an open handle: {r:?}");
                }
            }
            Op::Release { h } => match self.handle(*h) {
                Some(_) => self.release_at(usize::from(*h) % self.handles.len()),
                None => {
                    let r = self.fs.release(&mut self.store, Ino::ROOT, Fh(u64::MAX));
                    assert!(r.is_err(), "release of a handle nobody has");
                }
            },
            Op::Readdir { h, offset, plus } => {
                let (fh, ino) = self.handle_or_bogus(*h);
                if let Ok(entries) = self
                    .fs
                    .readdir(&mut self.store, ino, fh, u64::from(*offset))
                {
                    for (cookie, e) in entries {
                        assert!(cookie > u64::from(*offset), "readdir cookie went back");
                        if *plus && e.name != b"." && e.name != b".." {
                            // READDIRPLUS counts a lookup for every entry it returns.
                            if self.fs.readdirplus_entry(&mut self.store, &e).is_ok() {
                                self.hold(e.ino);
                            }
                        }
                    }
                }
            }
            Op::Fallocate { h, off, len, mode } => {
                let (fh, ino) = self.handle_or_bogus(*h);
                let mode = match mode % 4 {
                    0 => 0,
                    1 => FALLOC_FL_KEEP_SIZE,
                    2 => FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    _ => i32::from(*mode),
                };
                let _ =
                    self.fs
                        .fallocate(&mut self.store, &ctx, ino, fh, off.get(), len.get(), mode);
            }
            Op::Lseek { h, off, whence } => {
                let (fh, ino) = self.handle_or_bogus(*h);
                let whence = match whence % 3 {
                    0 => libc::SEEK_DATA,
                    1 => libc::SEEK_HOLE,
                    _ => i32::from(*whence),
                };
                let off = off.get() as i64;
                if let Ok(pos) = self.fs.lseek(&mut self.store, ino, fh, off, whence) {
                    let size = self.store.inodes.get(&ino).map_or(0, |i| i.size);
                    assert!(pos >= off, "lseek went back");
                    assert!(pos as u64 <= size, "lseek past the end");
                }
            }
            Op::Setxattr {
                t,
                name,
                value,
                flags,
            } => {
                let ino = self.pick(*t, Want::Any);
                let flags = match flags % 4 {
                    0 => 0,
                    1 => XATTR_CREATE,
                    2 => XATTR_REPLACE,
                    _ => i32::from(*flags),
                };
                let (name, value) = (name.bytes(), value.bytes());
                let r = self
                    .fs
                    .setxattr(&mut self.store, &ctx, ino, &name, &value, flags);
                if r.is_ok() {
                    match self.fs.getxattr(&mut self.store, ino, &name) {
                        Ok(v) => assert_eq!(v, value, "getxattr after setxattr"),
                        Err(e) => panic!("getxattr after setxattr: {e}"),
                    }
                }
            }
            Op::Getxattr { t, name } => {
                let ino = self.pick(*t, Want::Any);
                let _ = self.fs.getxattr(&mut self.store, ino, &name.bytes());
            }
            Op::Listxattr { t } => {
                let ino = self.pick(*t, Want::Any);
                if let Ok(list) = self.fs.listxattr(&mut self.store, ino) {
                    assert!(list.is_empty() || list.ends_with(&[0]));
                }
            }
            Op::Removexattr { t, name } => {
                let ino = self.pick(*t, Want::Any);
                let _ = self
                    .fs
                    .removexattr(&mut self.store, &ctx, ino, &name.bytes());
            }
            Op::Readlink { t } => {
                let ino = self.pick(*t, Want::NonDir);
                let _ = self.fs.readlink(&mut self.store, ino);
            }
            Op::Access { t, mask, root } => {
                let ino = self.pick(*t, Want::Any);
                let mut c = ctx;
                if *root {
                    c.uid = 0;
                }
                let _ = self
                    .fs
                    .access(&mut self.store, &c, ino, i32::from(*mask % 8));
            }
            Op::Forget { t, n } => {
                let ino = self.pick(*t, Want::Any);
                self.forget(ino, u64::from(*n).max(1));
            }
            Op::ForgetAll => self.forget_all(),
            Op::Restart => self.restart(),
        }
    }

    /// A fresh inode number, as the runtime hands them out.
    fn new_ino(&mut self) -> Ino {
        self.next_ino += 1;
        Ino(self.next_ino - 1)
    }

    /// Release every handle and forget every lookup, then check nothing is left behind.
    fn finish(&mut self) {
        while !self.handles.is_empty() {
            self.release_at(self.handles.len() - 1);
            check(self);
        }
        self.forget_all();
        check(self);
        if let Some(o) = self.store.orphans.first() {
            panic!("orphan {o} left with nothing open");
        }
        if let Some(i) = self.store.inodes.values().find(|i| i.nlink == 0) {
            panic!("unlinked inode left: {i:?}");
        }
        let before = self.store.clone();
        self.restart();
        assert_eq!(
            before.inodes, self.store.inodes,
            "a restart with nothing open changed the inodes"
        );
        check(self);
    }
}

fn acc_flags(acc: u8) -> i32 {
    match acc % 3 {
        0 => libc::O_RDONLY,
        1 => libc::O_WRONLY,
        _ => libc::O_RDWR,
    }
}

/// The storage invariants (see the module comment); panics with the first one broken.
fn check(k: &Kernel) {
    if let Err(e) = invariants(k) {
        panic!("invariant broken: {e}");
    }
}

fn invariants(k: &Kernel) -> Result<(), String> {
    let s = &k.store;
    let root = s.inodes.get(&Ino::ROOT).ok_or("no root")?;
    if root.kind != Kind::Dir {
        return Err("root is not a directory".into());
    }
    let mut links: BTreeMap<Ino, u32> = BTreeMap::new();
    let mut subdirs: BTreeMap<Ino, u32> = BTreeMap::new();
    let mut dir_parent: BTreeMap<Ino, Ino> = BTreeMap::new();
    let mut has_entries: BTreeSet<Ino> = BTreeSet::new();
    for ((parent, name), d) in &s.dentries {
        let shown = String::from_utf8_lossy(name);
        if name.is_empty()
            || name.len() > k.fs.limits.name_max
            || name.contains(&b'/')
            || name.contains(&0)
            || name == b"."
            || name == b".."
        {
            return Err(format!("invalid name {shown:?} in {parent}"));
        }
        match s.inodes.get(parent) {
            Some(p) if p.kind == Kind::Dir && p.nlink > 0 => {}
            other => return Err(format!("entry {parent}/{shown:?} in {other:?}")),
        }
        match s.inodes.get(&d.ino) {
            Some(i) if i.kind == d.kind => {}
            other => return Err(format!("entry {parent}/{shown:?} -> {d:?} is {other:?}")),
        }
        if d.ino == Ino::ROOT {
            return Err(format!("entry {parent}/{shown:?} names the root"));
        }
        *links.entry(d.ino).or_default() += 1;
        has_entries.insert(*parent);
        if d.kind == Kind::Dir {
            *subdirs.entry(*parent).or_default() += 1;
            if dir_parent.insert(d.ino, *parent).is_some() {
                return Err(format!("directory {} has two entries", d.ino));
            }
        }
    }
    let in_use = |ino: &Ino| k.lookups.contains_key(ino) || k.handles.iter().any(|h| h.1 == *ino);
    for (ino, i) in &s.inodes {
        if i.perm & !PERM_MASK != 0 {
            return Err(format!("inode {ino}: perm {:o}", i.perm));
        }
        if i.kind == Kind::File && i.size > k.fs.limits.file_size_max {
            return Err(format!("inode {ino}: size {} past the limit", i.size));
        }
        let found = links.get(ino).copied().unwrap_or(0);
        let dirs = subdirs.get(ino).copied().unwrap_or(0);
        if *ino == Ino::ROOT {
            if i.nlink != 2 + dirs {
                return Err(format!(
                    "root: nlink {} with {dirs} subdirectories",
                    i.nlink
                ));
            }
            continue;
        }
        if found == 0 {
            if i.nlink != 0 {
                return Err(format!(
                    "inode {ino}: nlink {} but no entry: {i:?}",
                    i.nlink
                ));
            }
            if has_entries.contains(ino) {
                return Err(format!("removed directory {ino} still has entries"));
            }
            if !s.orphans.contains(ino) {
                return Err(format!("unlinked inode {ino} is not in the orphan table"));
            }
            if !in_use(ino) {
                return Err(format!("unlinked inode {ino} is kept but nothing uses it"));
            }
            continue;
        }
        if s.orphans.contains(ino) {
            return Err(format!("linked inode {ino} is in the orphan table"));
        }
        if i.kind == Kind::Dir {
            if i.nlink != 2 + dirs {
                return Err(format!(
                    "directory {ino}: nlink {} with {dirs} subdirectories",
                    i.nlink
                ));
            }
            if dir_parent.get(ino) != Some(&i.parent) {
                return Err(format!(
                    "directory {ino}: entry in {:?}, parent pointer {}",
                    dir_parent.get(ino),
                    i.parent
                ));
            }
            let mut cur = *ino;
            let mut steps = 0;
            while cur != Ino::ROOT {
                steps += 1;
                if steps > s.inodes.len() {
                    return Err(format!("directory {ino}: parent chain loops"));
                }
                cur = s
                    .inodes
                    .get(&cur)
                    .ok_or_else(|| format!("directory {ino}: parent chain breaks at {cur}"))?
                    .parent;
            }
        } else if i.nlink != found {
            return Err(format!(
                "inode {ino}: nlink {} with {found} entries",
                i.nlink
            ));
        }
    }
    for o in &s.orphans {
        if !s.inodes.contains_key(o) {
            return Err(format!("orphan {o} has no inode"));
        }
    }
    for ((ino, idx), bytes) in &s.chunks {
        let i = s
            .inodes
            .get(ino)
            .ok_or_else(|| format!("chunk ({ino}, {idx}) of a missing inode"))?;
        if i.kind != Kind::File {
            return Err(format!("chunk ({ino}, {idx}) of a {:?}", i.kind));
        }
        let end = idx
            .checked_mul(CHUNK_SIZE)
            .and_then(|start| start.checked_add(bytes.len() as u64));
        if bytes.len() as u64 > CHUNK_SIZE || end.is_none_or(|end| end > i.size) {
            return Err(format!(
                "chunk ({ino}, {idx}) of {} bytes reaches past the size {}",
                bytes.len(),
                i.size
            ));
        }
    }
    for (ino, target) in &s.symlinks {
        match s.inodes.get(ino) {
            Some(i) if i.kind == Kind::Symlink && i.size == target.len() as u64 => {}
            other => return Err(format!("symlink target of {ino}: {other:?}")),
        }
    }
    for (ino, i) in &s.inodes {
        if i.kind == Kind::Symlink && !s.symlinks.contains_key(ino) {
            return Err(format!("symlink {ino} has no target"));
        }
    }
    for ((ino, name), value) in &s.xattrs {
        if !s.inodes.contains_key(ino) {
            return Err(format!("xattr of missing inode {ino}"));
        }
        if value.len() > k.fs.limits.xattr_value_max || name.len() > k.fs.limits.xattr_name_max {
            return Err(format!(
                "xattr {:?} of {ino} is too big",
                String::from_utf8_lossy(name)
            ));
        }
    }
    if k.fs.open_handles() != k.handles.len() {
        return Err(format!(
            "{} handles open in Fs, {} held",
            k.fs.open_handles(),
            k.handles.len()
        ));
    }
    Ok(())
}

/// Most operations per input, so one input stays fast.
const MAX_OPS: usize = 256;

fuzz_target!(|ops: Vec<Op>| {
    let mut k = Kernel::new();
    for op in ops.iter().take(MAX_OPS) {
        k.apply(op);
        check(&k);
    }
    k.finish();
});
