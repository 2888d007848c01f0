//! File content as a sequence of CHUNK_SIZE chunks: reads, writes, truncation, holes.
//!
//! Invariant: no stored byte lies at or past the file size, so growing a file (truncate up,
//! a write past the end) needs no zeroing: the gap reads as zero.

use crate::fs::FsResult;
use crate::store::Store;
use crate::types::{Ino, CHUNK_SIZE};

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

/// A zero-filled buffer, allocated with `malloc` and filled with `memset` rather than
/// `calloc` (`vec![0; len]`). jemalloc zeroes a recycled extent of 16 KiB or more with
/// `madvise(MADV_DONTNEED)`: that flushes the TLB of every CPU the daemon's threads ran on (an
/// inter-processor interrupt each, an exit to the host on a VM), and every page faults back in
/// when it is written. A 64 KiB `calloc` per persist was ~10% of the actor's time with one
/// writer (perf, session 9).
#[allow(clippy::slow_vector_initialization)]
pub fn zeroed(len: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(len);
    buf.resize(len, 0);
    buf
}

pub fn read(s: &mut impl Store, ino: Ino, offset: u64, len: usize) -> FsResult<Vec<u8>> {
    let mut out = zeroed(len);
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

/// Zero `[start, end)` of a file of `size` bytes (`end <= size`): whole chunks are dropped
/// with one range removal, the partial chunks at either end overwritten with zeros if they
/// hold data. A chunk holds no byte at or past the size, so when the hole reaches the size
/// the last chunk counts as whole from its start. The cost follows the stored chunks, not the
/// length: punching a hole across a sparse 16 TiB file must not walk 2^28 chunk indexes on
/// the actor.
pub fn punch_hole(s: &mut impl Store, ino: Ino, start: u64, end: u64, size: u64) -> FsResult<()> {
    if start >= end {
        return Ok(());
    }
    let first = start / CHUNK_SIZE;
    let last = (end - 1) / CHUNK_SIZE;
    let head = (start % CHUNK_SIZE) as usize;
    let tail = ((end - 1) % CHUNK_SIZE) as usize + 1;
    let to_size = end >= size;
    if first == last {
        return zero_in_chunk(s, ino, first, head, tail, to_size);
    }
    let mut whole_from = first;
    if head != 0 {
        zero_in_chunk(s, ino, first, head, CHUNK_SIZE as usize, false)?;
        whole_from = first + 1;
    }
    let mut whole_to = last + 1;
    if tail != CHUNK_SIZE as usize && !to_size {
        zero_in_chunk(s, ino, last, 0, tail, false)?;
        whole_to = last;
    }
    if whole_from < whole_to {
        s.remove_chunks(ino, whole_from, Some(whole_to))?;
    }
    Ok(())
}

/// Zero bytes `[from, to)` of chunk `idx`: drop it if that is all of it (or all it can hold:
/// `to_size`, `to` is the file size), write zeros if it holds data, nothing for a hole.
fn zero_in_chunk(
    s: &mut impl Store,
    ino: Ino,
    idx: u64,
    from: usize,
    to: usize,
    to_size: bool,
) -> FsResult<()> {
    if from == 0 && (to == CHUNK_SIZE as usize || to_size) {
        return Ok(s.remove_chunks(ino, idx, Some(idx + 1))?);
    }
    if s.next_chunk(ino, idx)? == Some(idx) {
        s.write_chunk(ino, idx, from, &zeroed(to - from))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    #[test]
    fn punching_a_hole_across_a_huge_sparse_file_touches_only_stored_chunks() -> FsResult<()> {
        let mut s = MemStore::default();
        let ino = Ino(2);
        let end = 1u64 << 44;
        write(&mut s, ino, 10, b"head")?;
        write(&mut s, ino, end - 100, b"tail")?;
        let size = end - 96;
        // 2^28 chunk indexes lie in between; this must not visit them one by one.
        s.chunk_calls = 0;
        punch_hole(&mut s, ino, 12, end - 98, size)?;
        assert!(s.chunk_calls < 10, "{} chunk calls", s.chunk_calls);
        assert_eq!(read(&mut s, ino, 10, 4)?, b"he\0\0");
        assert_eq!(read(&mut s, ino, end - 100, 4)?, b"\0\0il");
        // Up to the size: the last chunk is dropped, not zeroed, though it is not a whole
        // CHUNK_SIZE below the size.
        punch_hole(&mut s, ino, 0, size, size)?;
        assert!(s.chunks.is_empty(), "whole chunks are dropped");
        Ok(())
    }
}
