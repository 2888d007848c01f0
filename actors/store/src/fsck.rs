//! Offline consistency check of a data directory's database (`spoolfs fsck`).
//!
//! Invariants checked:
//! - every dentry points to a live inode of the kind it records;
//! - every inode's link count equals its dentries (directories: 2 + subdirectories), and a
//!   directory has exactly one dentry whose parent matches the inode's `parent`;
//! - walking `parent` pointers from any directory reaches the root (no cycles);
//! - inodes with no dentry are in the orphan table (nlink 0), and orphans have nlink 0;
//! - content chunks, xattrs and symlink targets belong to live inodes; no chunk holds bytes at
//!   or past its file's size; every symlink has a target.
//!
//! With `repair`, problems that have one safe answer are fixed in one transaction: link counts
//! recomputed, dangling dentries and records of missing inodes removed, chunk tails past the
//! size trimmed, unreachable inodes and orphans reclaimed.

use std::collections::{BTreeSet, HashMap};

use redb::{Database, ReadableTable, ReadableTableMetadata};
use spoolfs_core::{Ino, Inode, Kind, Store, CHUNK_SIZE};

use crate::codec::decode_inode;
use crate::{Tables, CHUNKS, DENTRIES, INODES, ORPHANS, SYMLINKS, XATTRS};

#[derive(Debug, Default)]
pub struct Report {
    pub inodes: u64,
    pub dentries: u64,
    pub chunks: u64,
    /// One line per problem found.
    pub problems: Vec<String>,
    /// Problems fixed (with `repair`).
    pub repaired: usize,
    /// Inodes unlinked while still open when the daemon stopped: not a problem, the daemon
    /// reclaims them when it starts (and `repair` does too).
    pub pending_orphans: u64,
}

/// Progress callback: (phase, done, total).
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, u64);

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// What a repair will change, collected during the read-only pass.
#[derive(Default)]
struct Fixes {
    remove_dentries: Vec<(u64, Vec<u8>)>,
    set_nlink: Vec<(Inode, u32)>,
    reclaim: BTreeSet<u64>,
    remove_chunks: Vec<(u64, u64)>,
    trim_chunks: Vec<(u64, u64, usize)>,
    remove_xattrs: Vec<(u64, Vec<u8>)>,
    remove_symlinks: Vec<u64>,
    remove_orphans: Vec<u64>,
}

pub fn check(db: &Database, repair: bool, progress: Progress<'_>) -> Result<Report, String> {
    let mut report = Report::default();
    let mut fixes = Fixes::default();
    {
        let txn = redb::ReadableDatabase::begin_read(db).map_err(e)?;
        let inodes_t = txn.open_table(INODES).map_err(e)?;
        let dentries_t = txn.open_table(DENTRIES).map_err(e)?;
        let total = inodes_t.len().map_err(e)?;

        let mut inodes: HashMap<u64, Inode> = HashMap::new();
        for (n, item) in inodes_t.iter().map_err(e)?.enumerate() {
            let (k, v) = item.map_err(e)?;
            match decode_inode(k.value(), v.value()) {
                Ok(i) => {
                    inodes.insert(k.value(), i);
                }
                Err(err) => report
                    .problems
                    .push(format!("inode {}: unreadable record: {err}", k.value())),
            }
            if n % 4096 == 0 {
                progress("inodes", n as u64, total);
            }
        }
        report.inodes = inodes.len() as u64;

        // Links found per inode, subdirectories per directory, dentries per directory inode.
        let mut links: HashMap<u64, u32> = HashMap::new();
        let mut subdirs: HashMap<u64, u32> = HashMap::new();
        let mut dir_entries: HashMap<u64, Vec<u64>> = HashMap::new();
        let total_d = dentries_t.len().map_err(e)?;
        for (n, item) in dentries_t.iter().map_err(e)?.enumerate() {
            let (k, v) = item.map_err(e)?;
            let (parent, name) = k.value();
            let (ino, kind) = v.value();
            report.dentries += 1;
            let shown = String::from_utf8_lossy(name).into_owned();
            let Some(target) = inodes.get(&ino) else {
                report.problems.push(format!(
                    "dentry {parent}/{shown:?} points to missing inode {ino}"
                ));
                fixes.remove_dentries.push((parent, name.to_vec()));
                continue;
            };
            if !matches!(inodes.get(&parent), Some(p) if p.kind == Kind::Dir) {
                report.problems.push(format!(
                    "dentry {parent}/{shown:?} is in a missing or non-directory parent"
                ));
                fixes.remove_dentries.push((parent, name.to_vec()));
                continue;
            }
            if Kind::from_byte(kind) != Some(target.kind) {
                report.problems.push(format!(
                    "dentry {parent}/{shown:?} records kind {kind} but inode {ino} is {:?}",
                    target.kind
                ));
            }
            *links.entry(ino).or_default() += 1;
            if target.kind == Kind::Dir {
                *subdirs.entry(parent).or_default() += 1;
                dir_entries.entry(ino).or_default().push(parent);
            }
            if n % 4096 == 0 {
                progress("dentries", n as u64, total_d);
            }
        }

        let orphans: BTreeSet<u64> = {
            let t = txn.open_table(ORPHANS).map_err(e)?;
            let mut s = BTreeSet::new();
            for item in t.iter().map_err(e)? {
                s.insert(item.map_err(e)?.0.value());
            }
            s
        };

        let mut ids: Vec<&u64> = inodes.keys().collect();
        ids.sort();
        for ino in ids {
            let inode = &inodes[ino];
            let ino = *ino;
            let found = links.get(&ino).copied().unwrap_or(0);
            if ino == Ino::ROOT.0 {
                if inode.kind != Kind::Dir {
                    report
                        .problems
                        .push("the root inode is not a directory".into());
                }
                let want = 2 + subdirs.get(&ino).copied().unwrap_or(0);
                if inode.nlink != want {
                    report
                        .problems
                        .push(format!("root: nlink {} should be {want}", inode.nlink));
                    fixes.set_nlink.push((inode.clone(), want));
                }
                continue;
            }
            if found == 0 {
                if orphans.contains(&ino) && inode.nlink == 0 {
                    // Unlinked while open when the daemon stopped: reclaimed at next start.
                    report.pending_orphans += 1;
                } else {
                    report
                        .problems
                        .push(format!("inode {ino}: no directory entry refers to it"));
                }
                fixes.reclaim.insert(ino);
                continue;
            }
            let want = if inode.kind == Kind::Dir {
                2 + subdirs.get(&ino).copied().unwrap_or(0)
            } else {
                found
            };
            if inode.nlink != want {
                report.problems.push(format!(
                    "inode {ino}: nlink {} should be {want}",
                    inode.nlink
                ));
                fixes.set_nlink.push((inode.clone(), want));
            }
            if inode.kind == Kind::Dir {
                let parents = &dir_entries[&ino];
                if parents.len() != 1 || parents[0] != inode.parent.0 {
                    report.problems.push(format!(
                        "directory {ino}: entries in {parents:?}, parent pointer {}",
                        inode.parent
                    ));
                }
                // Walk up to the root; more steps than directories means a cycle.
                let mut cur = ino;
                let mut steps = 0usize;
                while cur != Ino::ROOT.0 {
                    steps += 1;
                    match inodes.get(&cur) {
                        Some(i) if steps <= inodes.len() => cur = i.parent.0,
                        _ => {
                            report.problems.push(format!("directory {ino}: does not reach the root (cycle or broken parent chain)"));
                            break;
                        }
                    }
                }
            }
            if orphans.contains(&ino) {
                report
                    .problems
                    .push(format!("inode {ino}: in the orphan table but still linked"));
                fixes.remove_orphans.push(ino);
            }
        }
        for ino in &orphans {
            if !inodes.contains_key(ino) {
                report.problems.push(format!("orphan {ino}: inode missing"));
                fixes.remove_orphans.push(*ino);
            }
        }

        let chunks_t = txn.open_table(CHUNKS).map_err(e)?;
        let total_c = chunks_t.len().map_err(e)?;
        for (n, item) in chunks_t.iter().map_err(e)?.enumerate() {
            let (k, v) = item.map_err(e)?;
            let (ino, idx) = k.value();
            report.chunks += 1;
            let len = v.value().len() as u64;
            match inodes.get(&ino) {
                None => {
                    report
                        .problems
                        .push(format!("chunk ({ino}, {idx}) of missing inode"));
                    fixes.remove_chunks.push((ino, idx));
                }
                Some(i) => {
                    let start = idx.saturating_mul(CHUNK_SIZE);
                    if len > CHUNK_SIZE || start.saturating_add(len) > i.size {
                        report.problems.push(format!(
                            "chunk ({ino}, {idx}): {len} bytes reach past the file size {}",
                            i.size
                        ));
                        if start >= i.size {
                            fixes.remove_chunks.push((ino, idx));
                        } else {
                            let keep = (i.size - start).min(CHUNK_SIZE) as usize;
                            fixes.trim_chunks.push((ino, idx, keep));
                        }
                    }
                }
            }
            if n % 4096 == 0 {
                progress("chunks", n as u64, total_c);
            }
        }
        let xattrs_t = txn.open_table(XATTRS).map_err(e)?;
        for item in xattrs_t.iter().map_err(e)? {
            let (k, _) = item.map_err(e)?;
            let (ino, name) = k.value();
            if !inodes.contains_key(&ino) {
                report
                    .problems
                    .push(format!("xattr of missing inode {ino}"));
                fixes.remove_xattrs.push((ino, name.to_vec()));
            }
        }
        let symlinks_t = txn.open_table(SYMLINKS).map_err(e)?;
        let mut targets = BTreeSet::new();
        for item in symlinks_t.iter().map_err(e)? {
            let ino = item.map_err(e)?.0.value();
            targets.insert(ino);
            if !inodes.contains_key(&ino) {
                report
                    .problems
                    .push(format!("symlink target of missing inode {ino}"));
                fixes.remove_symlinks.push(ino);
            }
        }
        for (ino, i) in &inodes {
            if i.kind == Kind::Symlink && !targets.contains(ino) {
                report.problems.push(format!("symlink {ino}: no target"));
            }
        }
    }
    if repair && (!report.problems.is_empty() || report.pending_orphans > 0) {
        report.repaired = apply(db, fixes)?;
    }
    Ok(report)
}

fn apply(db: &Database, fixes: Fixes) -> Result<usize, String> {
    let txn = db.begin_write().map_err(e)?;
    let mut n = 0;
    {
        let mut t = Tables::open(&txn).map_err(e)?;
        for (parent, name) in &fixes.remove_dentries {
            t.remove_dentry(Ino(*parent), name).map_err(e)?;
            n += 1;
        }
        for (mut inode, nlink) in fixes.set_nlink {
            inode.nlink = nlink;
            t.put_inode(&inode).map_err(e)?;
            n += 1;
        }
        for ino in &fixes.reclaim {
            t.remove_inode(Ino(*ino)).map_err(e)?;
            t.remove_orphan(Ino(*ino)).map_err(e)?;
            n += 1;
        }
        for (ino, idx) in &fixes.remove_chunks {
            t.remove_chunk(Ino(*ino), *idx).map_err(e)?;
            n += 1;
        }
        for (ino, idx, keep) in &fixes.trim_chunks {
            t.truncate_chunk(Ino(*ino), *idx, *keep).map_err(e)?;
            n += 1;
        }
        for (ino, name) in &fixes.remove_xattrs {
            t.remove_xattr(Ino(*ino), name).map_err(e)?;
            n += 1;
        }
        for ino in &fixes.remove_symlinks {
            t.symlinks.remove(*ino).map_err(e)?;
            n += 1;
        }
        for ino in &fixes.remove_orphans {
            t.remove_orphan(Ino(*ino)).map_err(e)?;
            n += 1;
        }
    }
    txn.commit().map_err(e)?;
    Ok(n)
}
