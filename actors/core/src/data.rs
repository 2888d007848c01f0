//! File content as a sequence of CHUNK_SIZE chunks: reads, writes, truncation, holes.
//!
//! Invariant: no stored byte lies at or past the file size, so growing a file (truncate up,
//! a write past the end) needs no zeroing: the gap reads as zero.

use crate::fs::FsResult;
use crate::store::Store;
use crate::types::{Errno, Ino, CHUNK_SIZE};

/// Split `[offset, offset + len)` into (chunk index, offset in chunk, length) pieces.
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut pos = offset;
    let end = offset.saturating_add(len as u64);
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let idx = pos / CHUNK_SIZE;
        let in_chunk = (pos % CHUNK_SIZE) as usize;
        let n = ((CHUNK_SIZE as usize) - in_chunk).min((end - pos) as usize);
        pos += n as u64;
        Some((idx, in_chunk, n))
    })
}

pub fn read(s: &mut impl Store, ino: Ino, offset: u64, len: usize) -> FsResult<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut at = 0;
    for (idx, in_chunk, n) in pieces(offset, len) {
        s.read_chunk(ino, idx, in_chunk, &mut out[at..at + n])?;
        at += n;
    }
    Ok(out)
}

pub fn write(s: &mut impl Store, ino: Ino, offset: u64, data: &[u8]) -> FsResult<()> {
    let mut at = 0;
    for (idx, in_chunk, n) in pieces(offset, data.len()) {
        s.write_chunk(ino, idx, in_chunk, &data[at..at + n])?;
        at += n;
    }
    Ok(())
}

/// Shrink content from `old` to `new` bytes (growing needs no work, see the module invariant).
pub fn truncate(s: &mut impl Store, ino: Ino, old: u64, new: u64) -> FsResult<()> {
    if new >= old {
        return Ok(());
    }
    let keep_in_last = (new % CHUNK_SIZE) as usize;
    let first_gone = if keep_in_last == 0 {
        new / CHUNK_SIZE
    } else {
        s.truncate_chunk(ino, new / CHUNK_SIZE, keep_in_last)?;
        new / CHUNK_SIZE + 1
    };
    s.remove_chunks(ino, first_gone, None)?;
    Ok(())
}

/// Zero `[start, end)` (already clipped to the file size): whole chunks are dropped, partial
/// ones overwritten with zeros if they hold data.
pub fn punch_hole(s: &mut impl Store, ino: Ino, start: u64, end: u64) -> FsResult<()> {
    if start >= end {
        return Ok(());
    }
    let len = usize::try_from(end - start).map_err(|_| Errno::EFBIG)?;
    let mut whole: Option<(u64, u64)> = None;
    for (idx, in_chunk, n) in pieces(start, len) {
        if n as u64 == CHUNK_SIZE {
            whole = Some(match whole {
                None => (idx, idx + 1),
                Some((a, _)) => (a, idx + 1),
            });
        } else if s.next_chunk(ino, idx)? == Some(idx) {
            s.write_chunk(ino, idx, in_chunk, &vec![0u8; n])?;
        }
    }
    if let Some((a, b)) = whole {
        s.remove_chunks(ino, a, Some(b))?;
    }
    Ok(())
}

/// SEEK_DATA: the first offset `>= offset` inside a stored chunk, below `size`.
pub fn seek_data(s: &mut impl Store, ino: Ino, offset: u64, size: u64) -> FsResult<Option<u64>> {
    Ok(s.next_chunk(ino, offset / CHUNK_SIZE)?
        .map(|idx| (idx * CHUNK_SIZE).max(offset))
        .filter(|pos| *pos < size))
}

/// SEEK_HOLE: the first offset `>= offset` in a missing chunk, or the size (the implicit
/// hole at the end of every file).
pub fn seek_hole(s: &mut impl Store, ino: Ino, offset: u64, size: u64) -> FsResult<Option<u64>> {
    let mut idx = offset / CHUNK_SIZE;
    while s.next_chunk(ino, idx)? == Some(idx) {
        idx += 1;
    }
    Ok(Some((idx * CHUNK_SIZE).max(offset).min(size)))
}
