//! The kernel's part: resolve paths, hold references and handles, apply each operation to
//! both sides, compare every answer and then the whole state.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use spoolfs_core::{Kind, Timestamp};

use super::model::ROOT;
use super::ops::*;
use super::sut::bstr;
use super::{Attr, Contents, Side, Snapshot};

type Step<T> = Result<T, String>;

/// An open handle: the same open on both sides.
#[derive(Clone, Copy, Debug)]
struct Slot<HA, HB> {
    ino: u64,
    a: HA,
    b: HB,
    dir: bool,
}

pub struct Driver<A: Side, B: Side> {
    pub a: A,
    pub b: B,
    /// References the kernel holds on each inode (LOOKUP and friends add, FORGET drops).
    kernel: BTreeMap<u64, u64>,
    slots: Vec<Slot<A::H, B::H>>,
    next_ino: u64,
    clock: i64,
    /// Files whose content changed since the last comparison.
    dirty: BTreeSet<u64>,
    /// Compare every file's content every this many operations (and at the end).
    pub full_every: usize,
    /// Operations applied so far.
    pub applied: usize,
    /// How often each request ended how ("rename ENOTEMPTY"), for tuning the generator.
    pub stats: BTreeMap<String, usize>,
}

/// Which handles an operation may pick.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pick {
    Any,
    File,
    Dir,
}

/// The outcome of a request as a stats key: "ok" or the errno's name.
pub trait Outcome {
    fn outcome(&self) -> &'static str;
}

impl<T> Outcome for Result<T, spoolfs_core::Errno> {
    fn outcome(&self) -> &'static str {
        match self {
            Ok(_) => "ok",
            Err(e) => e.name(),
        }
    }
}

fn same<T: PartialEq + Debug>(what: &str, a: &T, b: &T) -> Step<()> {
    if a == b {
        Ok(())
    } else {
        Err(format!("{what}: {a:?} != {b:?}"))
    }
}

impl<A: Side, B: Side> Driver<A, B> {
    pub fn new(a: A, b: B) -> Self {
        Driver {
            a,
            b,
            kernel: BTreeMap::new(),
            slots: Vec::new(),
            next_ino: ROOT + 1,
            clock: 1,
            dirty: BTreeSet::new(),
            full_every: 16,
            applied: 0,
            stats: BTreeMap::new(),
        }
    }

    /// Apply every operation, then shut down in order (release, forget) and check that
    /// nothing is left behind.
    pub fn run(&mut self, ops: &[Op]) -> Step<()> {
        for (i, op) in ops.iter().enumerate() {
            self.apply(op)
                .map_err(|e| format!("op #{i} {op:?}:\n  {e}"))?;
        }
        self.finish().map_err(|e| format!("at the end: {e}"))
    }

    fn same<T: PartialEq + Debug + Outcome>(&mut self, what: &str, a: &T, b: &T) -> Step<()> {
        *self
            .stats
            .entry(format!("{what} {}", a.outcome()))
            .or_insert(0) += 1;
        same(what, a, b)
    }

    fn alloc_ino(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    fn hold(&mut self, ino: u64) {
        *self.kernel.entry(ino).or_insert(0) += 1;
    }

    fn lookup(&mut self, parent: u64, name: &[u8]) -> Step<Option<Attr>> {
        let ra = self.a.lookup(parent, name);
        let rb = self.b.lookup(parent, name);
        *self
            .stats
            .entry(format!("lookup {}", ra.outcome()))
            .or_insert(0) += 1;
        same(&format!("lookup({parent}, {:?})", bstr(name)), &ra, &rb)?;
        Ok(match ra {
            Ok(attr) => {
                self.hold(attr.ino);
                Some(attr)
            }
            Err(_) => None,
        })
    }

    /// Walk a path with LOOKUPs; `None` when it does not resolve (the same way on both).
    fn resolve(&mut self, path: &[Vec<u8>]) -> Step<Option<Attr>> {
        if path.is_empty() {
            return self.getattr(ROOT);
        }
        let mut cur = ROOT;
        let mut attr = None;
        for n in path {
            match self.lookup(cur, n)? {
                Some(a) => {
                    cur = a.ino;
                    attr = Some(a);
                }
                None => return Ok(None),
            }
        }
        Ok(attr)
    }

    fn getattr(&mut self, ino: u64) -> Step<Option<Attr>> {
        let ra = self.a.getattr(ino);
        let rb = self.b.getattr(ino);
        same(&format!("getattr({ino})"), &ra, &rb)?;
        Ok(ra.ok())
    }

    /// The existing entries of a kind (per side a, which side b must match anyway).
    fn live(&mut self, sel: Sel) -> Vec<Vec<Vec<u8>>> {
        self.a
            .tree()
            .into_iter()
            .filter(|(_, kind)| match sel {
                Sel::Any => true,
                Sel::Dir => *kind == Kind::Dir,
                Sel::File => *kind == Kind::File,
                Sel::NonDir => *kind != Kind::Dir,
            })
            .map(|(path, _)| path)
            .collect()
    }

    /// The index of the `h`-th (modulo their number) open handle of the wanted kind.
    fn pick_index(&self, h: u8, pick: Pick) -> Option<usize> {
        let fits: Vec<usize> = (0..self.slots.len())
            .filter(|i| match pick {
                Pick::Any => true,
                Pick::File => !self.slots[*i].dir,
                Pick::Dir => self.slots[*i].dir,
            })
            .collect();
        if fits.is_empty() {
            None
        } else {
            Some(fits[usize::from(h) % fits.len()])
        }
    }

    fn pick(&self, h: u8, pick: Pick) -> Option<Slot<A::H, B::H>> {
        self.pick_index(h, pick).map(|i| self.slots[i])
    }

    /// The inode a `Ref` names, `None` when there is none (the op is then done).
    fn resolve_ref(&mut self, r: &Ref) -> Step<Option<Attr>> {
        match r {
            Ref::At(p) => {
                let names: Vec<Vec<u8>> = p.0.iter().map(|n| name(*n).to_vec()).collect();
                self.resolve(&names)
            }
            Ref::Live(sel, i) => {
                let mut paths = self.live(*sel);
                if matches!(sel, Sel::Any | Sel::Dir) {
                    paths.push(Vec::new());
                }
                if paths.is_empty() {
                    return Ok(None);
                }
                let path = paths[usize::from(*i) % paths.len()].clone();
                self.resolve(&path)
            }
            Ref::Handle(h) => match self.pick(*h, Pick::Any) {
                Some(s) => self.getattr(s.ino),
                None => Ok(None),
            },
        }
    }

    /// The directory and name a `Loc` names, `None` when there is none.
    fn resolve_loc(&mut self, l: &Loc) -> Step<Option<(u64, Vec<u8>)>> {
        match l {
            Loc::In(r, n) => Ok(self.resolve_ref(r)?.map(|a| (a.ino, name(*n).to_vec()))),
            Loc::Entry(sel, i) => {
                let paths = self.live(*sel);
                if paths.is_empty() {
                    return Ok(None);
                }
                let mut path = paths[usize::from(*i) % paths.len()].clone();
                let Some(last) = path.pop() else {
                    return Ok(None);
                };
                Ok(self.resolve(&path)?.map(|a| (a.ino, last)))
            }
        }
    }

    /// Compare two answers; on success of a call that hands the kernel an entry, count
    /// the reference it now holds.
    fn entry(
        &mut self,
        what: &str,
        ra: Result<Attr, spoolfs_core::Errno>,
        rb: Result<Attr, spoolfs_core::Errno>,
    ) -> Step<()> {
        self.same(what, &ra, &rb)?;
        if let Ok(a) = ra {
            self.hold(a.ino);
        }
        Ok(())
    }

    pub fn apply(&mut self, op: &Op) -> Step<()> {
        self.clock += 1;
        let now = Timestamp::new(self.clock, 0);
        self.a.tick(now);
        self.b.tick(now);
        self.apply_op(op)?;
        self.a.op_done(self.applied);
        self.b.op_done(self.applied);
        self.applied += 1;
        let all = self.applied.is_multiple_of(self.full_every);
        self.compare(all)
    }

    fn apply_op(&mut self, op: &Op) -> Step<()> {
        match op {
            Op::Mkdir { at, mode } => {
                let Some((p, n)) = self.resolve_loc(at)? else {
                    return Ok(());
                };
                let ino = self.alloc_ino();
                let ra = self.a.mkdir(p, &n, dir_mode(*mode), ino);
                let rb = self.b.mkdir(p, &n, dir_mode(*mode), ino);
                self.entry("mkdir", ra, rb)
            }
            Op::Create { at, mode, acc } => {
                let Some((p, n)) = self.resolve_loc(at)? else {
                    return Ok(());
                };
                let ino = self.alloc_ino();
                let flags = acc_flags(*acc) | libc::O_CREAT;
                let ra = self.a.create(p, &n, file_mode(*mode), flags, ino);
                let rb = self.b.create(p, &n, file_mode(*mode), flags, ino);
                let attr_a = ra.as_ref().map(|(a, _)| a.clone()).map_err(|e| *e);
                let attr_b = rb.as_ref().map(|(a, _)| a.clone()).map_err(|e| *e);
                self.entry("create", attr_a, attr_b)?;
                if let (Ok((_, ha)), Ok((_, hb))) = (ra, rb) {
                    self.slots.push(Slot {
                        ino,
                        a: ha,
                        b: hb,
                        dir: false,
                    });
                }
                Ok(())
            }
            Op::Mknod { at } => {
                let Some((p, n)) = self.resolve_loc(at)? else {
                    return Ok(());
                };
                let ino = self.alloc_ino();
                let mode = libc::S_IFIFO | 0o644;
                let ra = self.a.mknod(p, &n, mode, ino);
                let rb = self.b.mknod(p, &n, mode, ino);
                self.entry("mknod", ra, rb)
            }
            Op::Symlink { at, target } => {
                let Some((p, n)) = self.resolve_loc(at)? else {
                    return Ok(());
                };
                let ino = self.alloc_ino();
                let t = symlink_target(*target);
                let ra = self.a.symlink(p, &n, &t, ino);
                let rb = self.b.symlink(p, &n, &t, ino);
                self.entry("symlink", ra, rb)
            }
            Op::Link { src, at } => {
                let Some(src) = self.resolve_ref(src)? else {
                    return Ok(());
                };
                let Some((p, n)) = self.resolve_loc(at)? else {
                    return Ok(());
                };
                let ra = self.a.link(src.ino, p, &n);
                let rb = self.b.link(src.ino, p, &n);
                self.entry("link", ra, rb)
            }
            Op::Unlink { at } => {
                let Some((p, n)) = self.resolve_loc(at)? else {
                    return Ok(());
                };
                let ra = self.a.unlink(p, &n);
                let rb = self.b.unlink(p, &n);
                self.same("unlink", &ra, &rb)
            }
            Op::Rmdir { at } => {
                let Some((p, n)) = self.resolve_loc(at)? else {
                    return Ok(());
                };
                let ra = self.a.rmdir(p, &n);
                let rb = self.b.rmdir(p, &n);
                self.same("rmdir", &ra, &rb)
            }
            Op::Rename { from, to, flags } => {
                let Some((p, n)) = self.resolve_loc(from)? else {
                    return Ok(());
                };
                let Some((np, nn)) = self.resolve_loc(to)? else {
                    return Ok(());
                };
                let f = rename_flags(*flags);
                let ra = self.a.rename(p, &n, np, &nn, f);
                let rb = self.b.rename(p, &n, np, &nn, f);
                let what = match (f.noreplace, f.exchange) {
                    (true, _) => "rename(noreplace)",
                    (_, true) => "rename(exchange)",
                    _ => "rename",
                };
                self.same(what, &ra, &rb)
            }
            Op::Lookup { path } => {
                let names: Vec<Vec<u8>> = path.0.iter().map(|n| name(*n).to_vec()).collect();
                self.resolve(&names).map(|_| ())
            }
            Op::Open { target, acc } => {
                let Some(attr) = self.resolve_ref(target)? else {
                    return Ok(());
                };
                if attr.kind != Kind::File {
                    return Ok(());
                }
                let flags = acc_flags(*acc);
                let ra = self.a.open(attr.ino, flags);
                let rb = self.b.open(attr.ino, flags);
                self.same(
                    "open",
                    &ra.as_ref().map(|_| ()).map_err(|e| *e),
                    &rb.as_ref().map(|_| ()).map_err(|e| *e),
                )?;
                if let (Ok(ha), Ok(hb)) = (ra, rb) {
                    self.slots.push(Slot {
                        ino: attr.ino,
                        a: ha,
                        b: hb,
                        dir: false,
                    });
                }
                Ok(())
            }
            Op::OpenDir { target } => {
                let Some(attr) = self.resolve_ref(target)? else {
                    return Ok(());
                };
                let ra = self.a.opendir(attr.ino);
                let rb = self.b.opendir(attr.ino);
                self.same(
                    "opendir",
                    &ra.as_ref().map(|_| ()).map_err(|e| *e),
                    &rb.as_ref().map(|_| ()).map_err(|e| *e),
                )?;
                if let (Ok(ha), Ok(hb)) = (ra, rb) {
                    self.slots.push(Slot {
                        ino: attr.ino,
                        a: ha,
                        b: hb,
                        dir: true,
                    });
                }
                Ok(())
            }
            Op::Readdir { h } => {
                let Some(s) = self.pick(*h, Pick::Dir) else {
                    return Ok(());
                };
                let ra = self.a.readdir(s.ino, s.a);
                let rb = self.b.readdir(s.ino, s.b);
                self.same("readdir", &ra, &rb)
            }
            Op::Write {
                h,
                offset,
                len,
                seed,
            } => {
                let Some(s) = self.pick(*h, Pick::File) else {
                    return Ok(());
                };
                let data = pattern(*seed, *len as usize);
                let ra = self.a.write(s.ino, s.a, *offset, &data);
                let rb = self.b.write(s.ino, s.b, *offset, &data);
                self.dirty.insert(s.ino);
                self.same("write", &ra, &rb)
            }
            Op::Read { h, offset, len } => {
                let Some(s) = self.pick(*h, Pick::File) else {
                    return Ok(());
                };
                let ra = self.a.read(s.ino, s.a, *offset, *len);
                let rb = self.b.read(s.ino, s.b, *offset, *len);
                *self
                    .stats
                    .entry(format!("read {}", ra.outcome()))
                    .or_insert(0) += 1;
                if ra != rb {
                    return Err(format!("read: {}", diff_bytes(&ra, &rb)));
                }
                Ok(())
            }
            Op::Release { h } => {
                let Some(i) = self.pick_index(*h, Pick::Any) else {
                    return Ok(());
                };
                let s = self.slots.remove(i);
                let ra = self.a.release(s.ino, s.a, s.dir);
                let rb = self.b.release(s.ino, s.b, s.dir);
                self.same("release", &ra, &rb)
            }
            Op::Truncate { target, size } => {
                let Some(attr) = self.resolve_ref(target)? else {
                    return Ok(());
                };
                let ra = self.a.truncate(attr.ino, *size, None);
                let rb = self.b.truncate(attr.ino, *size, None);
                self.dirty.insert(attr.ino);
                self.same("truncate", &ra, &rb)
            }
            Op::Ftruncate { h, size } => {
                let Some(s) = self.pick(*h, Pick::File) else {
                    return Ok(());
                };
                let ra = self.a.truncate(s.ino, *size, Some(s.a));
                let rb = self.b.truncate(s.ino, *size, Some(s.b));
                self.dirty.insert(s.ino);
                self.same("ftruncate", &ra, &rb)
            }
            Op::Fallocate {
                h,
                offset,
                len,
                mode,
            } => {
                let Some(s) = self.pick(*h, Pick::File) else {
                    return Ok(());
                };
                let m = falloc_mode(*mode);
                let ra = self.a.fallocate(s.ino, s.a, *offset, *len, m);
                let rb = self.b.fallocate(s.ino, s.b, *offset, *len, m);
                self.dirty.insert(s.ino);
                self.same("fallocate", &ra, &rb)
            }
            Op::SetXattr {
                target,
                name: n,
                value,
                flags,
            } => {
                let Some(Attr { ino, .. }) = self.resolve_ref(target)? else {
                    return Ok(());
                };
                let v = pattern(*value, usize::from(*value % 24));
                let f = xattr_flags(*flags);
                let ra = self.a.setxattr(ino, xattr_name(*n), &v, f);
                let rb = self.b.setxattr(ino, xattr_name(*n), &v, f);
                self.same("setxattr", &ra, &rb)
            }
            Op::GetXattr { target, name: n } => {
                let Some(Attr { ino, .. }) = self.resolve_ref(target)? else {
                    return Ok(());
                };
                let ra = self.a.getxattr(ino, xattr_name(*n));
                let rb = self.b.getxattr(ino, xattr_name(*n));
                self.same("getxattr", &ra, &rb)
            }
            Op::ListXattr { target } => {
                let Some(Attr { ino, .. }) = self.resolve_ref(target)? else {
                    return Ok(());
                };
                let ra = self.a.listxattr(ino);
                let rb = self.b.listxattr(ino);
                self.same("listxattr", &ra, &rb)
            }
            Op::RemoveXattr { target, name: n } => {
                let Some(Attr { ino, .. }) = self.resolve_ref(target)? else {
                    return Ok(());
                };
                let ra = self.a.removexattr(ino, xattr_name(*n));
                let rb = self.b.removexattr(ino, xattr_name(*n));
                self.same("removexattr", &ra, &rb)
            }
            Op::Readlink { target } => {
                let Some(attr) = self.resolve_ref(target)? else {
                    return Ok(());
                };
                let ra = self.a.readlink(attr.ino);
                let rb = self.b.readlink(attr.ino);
                self.same("readlink", &ra, &rb)
            }
            Op::Forget { pick, all } => {
                let known: Vec<(u64, u64)> = self.kernel.iter().map(|(k, v)| (*k, *v)).collect();
                if known.is_empty() {
                    return Ok(());
                }
                let (ino, count) = known[usize::from(*pick) % known.len()];
                let n = if *all { count } else { 1 };
                self.forget(ino, n);
                Ok(())
            }
            Op::ForgetAll => {
                self.forget_all();
                Ok(())
            }
            Op::Restart => {
                self.a.restart();
                self.b.restart();
                self.slots.clear();
                self.kernel.clear();
                Ok(())
            }
        }
    }

    fn forget(&mut self, ino: u64, n: u64) {
        self.a.forget(ino, n);
        self.b.forget(ino, n);
        if let Some(c) = self.kernel.get_mut(&ino) {
            *c -= n;
            if *c == 0 {
                self.kernel.remove(&ino);
            }
        }
    }

    fn forget_all(&mut self) {
        let known: Vec<(u64, u64)> = self.kernel.iter().map(|(k, v)| (*k, *v)).collect();
        for (ino, n) in known {
            self.forget(ino, n);
        }
    }

    /// Compare the whole state: always structure and metadata, and the content of the files
    /// written since the last time (or of every file when `all`).
    pub fn compare(&mut self, all: bool) -> Step<()> {
        let dirty = std::mem::take(&mut self.dirty);
        let contents = if all {
            Contents::All
        } else {
            Contents::Only(&dirty)
        };
        let sa = self
            .a
            .snapshot(contents)
            .map_err(|e| format!("side a: {e}"))?;
        let sb = self
            .b
            .snapshot(contents)
            .map_err(|e| format!("side b: {e}"))?;
        if sa != sb {
            return Err(format!("state differs:\n{}", diff_snapshots(&sa, &sb)));
        }
        if sa.known_inodes != self.kernel.len() {
            return Err(format!(
                "{} inodes known, the kernel holds {}",
                sa.known_inodes,
                self.kernel.len()
            ));
        }
        if sa.open_handles != self.slots.len() {
            return Err(format!(
                "{} handles open, the kernel holds {}",
                sa.open_handles,
                self.slots.len()
            ));
        }
        Ok(())
    }

    /// Orderly shutdown: release every handle, forget every inode; then nothing but the
    /// linked tree may remain (no orphans, no stray records).
    pub fn finish(&mut self) -> Step<()> {
        self.compare(true)?;
        while let Some(s) = self.slots.pop() {
            let ra = self.a.release(s.ino, s.a, s.dir);
            let rb = self.b.release(s.ino, s.b, s.dir);
            self.same("release", &ra, &rb)?;
            self.compare(false)?;
        }
        self.forget_all();
        self.compare(true)?;
        let s = self.b.snapshot(Contents::All)?;
        if !s.orphans.is_empty() {
            return Err(format!("orphans left with nothing open: {:?}", s.orphans));
        }
        if let Some((ino, n)) = s.nodes.iter().find(|(_, n)| n.nlink == 0) {
            return Err(format!("unlinked inode {ino} left: {n:?}"));
        }
        Ok(())
    }
}

fn diff_bytes(
    a: &Result<Vec<u8>, spoolfs_core::Errno>,
    b: &Result<Vec<u8>, spoolfs_core::Errno>,
) -> String {
    match (a, b) {
        (Ok(a), Ok(b)) => {
            let at = a.iter().zip(b).position(|(x, y)| x != y);
            format!(
                "{} vs {} bytes, first difference at {:?}",
                a.len(),
                b.len(),
                at.map(|i| (i, a[i], b[i]))
            )
        }
        _ => format!(
            "{:?} vs {:?}",
            a.as_ref().map(Vec::len),
            b.as_ref().map(Vec::len)
        ),
    }
}

fn diff_map<K: Ord + Debug, V: PartialEq + Debug>(
    out: &mut String,
    what: &str,
    a: &BTreeMap<K, V>,
    b: &BTreeMap<K, V>,
) {
    for (k, va) in a {
        match b.get(k) {
            None => out.push_str(&format!("  {what} {k:?}: only in a: {va:?}\n")),
            Some(vb) if vb != va => out.push_str(&format!(
                "  {what} {k:?}: a {va:?}\n  {what} {k:?}: b {vb:?}\n"
            )),
            _ => {}
        }
    }
    for (k, vb) in b {
        if !a.contains_key(k) {
            out.push_str(&format!("  {what} {k:?}: only in b: {vb:?}\n"));
        }
    }
}

pub fn diff_snapshots(a: &Snapshot, b: &Snapshot) -> String {
    let mut out = String::new();
    diff_map(&mut out, "inode", &a.nodes, &b.nodes);
    diff_map(&mut out, "dentry", &a.dentries, &b.dentries);
    diff_map(&mut out, "symlink", &a.symlinks, &b.symlinks);
    diff_map(&mut out, "xattr", &a.xattrs, &b.xattrs);
    for (ino, ca) in &a.contents {
        let cb = b.contents.get(ino).cloned().unwrap_or_default();
        if *ca != cb {
            out.push_str(&format!(
                "  content of {ino}: {}\n",
                diff_bytes(&Ok(ca.clone()), &Ok(cb))
            ));
        }
    }
    if a.contents.keys().ne(b.contents.keys()) {
        out.push_str(&format!(
            "  contents of {:?} vs {:?}\n",
            a.contents.keys().collect::<Vec<_>>(),
            b.contents.keys().collect::<Vec<_>>()
        ));
    }
    if a.orphans != b.orphans {
        out.push_str(&format!("  orphans {:?} vs {:?}\n", a.orphans, b.orphans));
    }
    if a.open_handles != b.open_handles {
        out.push_str(&format!(
            "  open handles {} vs {}\n",
            a.open_handles, b.open_handles
        ));
    }
    if a.known_inodes != b.known_inodes {
        out.push_str(&format!(
            "  known inodes {} vs {}\n",
            a.known_inodes, b.known_inodes
        ));
    }
    out
}
