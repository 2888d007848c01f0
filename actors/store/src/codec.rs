//! Fixed-size little-endian encoding of inode records, with a leading version byte so the
//! format can evolve with a migration instead of a silent misread.

use spoolfs_core::{Ino, Inode, Kind, Timestamp};

pub const INODE_RECORD_V1: u8 = 1;
pub const INODE_RECORD_LEN: usize = 86;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Length(usize),
    Version(u8),
    Kind(u8),
    Nanos(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Length(n) => {
                write!(f, "inode record has {n} bytes, expected {INODE_RECORD_LEN}")
            }
            DecodeError::Version(v) => write!(f, "inode record version {v} is unknown"),
            DecodeError::Kind(k) => write!(f, "inode record has unknown kind {k}"),
            DecodeError::Nanos(n) => write!(f, "inode record has a timestamp with {n} ns"),
        }
    }
}

impl std::error::Error for DecodeError {}

pub fn encode_inode(inode: &Inode) -> [u8; INODE_RECORD_LEN] {
    let mut out = [0u8; INODE_RECORD_LEN];
    let mut w = Writer {
        buf: &mut out,
        at: 0,
    };
    w.bytes(&[INODE_RECORD_V1, inode.kind.to_byte()]);
    w.bytes(&inode.perm.to_le_bytes());
    w.bytes(&inode.nlink.to_le_bytes());
    w.bytes(&inode.uid.to_le_bytes());
    w.bytes(&inode.gid.to_le_bytes());
    w.bytes(&inode.size.to_le_bytes());
    w.bytes(&inode.rdev.to_le_bytes());
    for t in [inode.atime, inode.mtime, inode.ctime, inode.crtime] {
        w.bytes(&t.secs.to_le_bytes());
        w.bytes(&t.nanos.to_le_bytes());
    }
    w.bytes(&inode.parent.0.to_le_bytes());
    debug_assert_eq!(w.at, INODE_RECORD_LEN);
    out
}

pub fn decode_inode(ino: u64, buf: &[u8]) -> Result<Inode, DecodeError> {
    if buf.len() != INODE_RECORD_LEN {
        return Err(DecodeError::Length(buf.len()));
    }
    let mut r = Reader { buf, at: 0 };
    let version = r.u8();
    if version != INODE_RECORD_V1 {
        return Err(DecodeError::Version(version));
    }
    let kind_byte = r.u8();
    let kind = Kind::from_byte(kind_byte).ok_or(DecodeError::Kind(kind_byte))?;
    let perm = r.u32();
    let nlink = r.u32();
    let uid = r.u32();
    let gid = r.u32();
    let size = r.u64();
    let rdev = r.u32();
    let mut times = [Timestamp::default(); 4];
    for t in &mut times {
        let secs = r.u64() as i64;
        let nanos = r.u32();
        if nanos >= 1_000_000_000 {
            return Err(DecodeError::Nanos(nanos));
        }
        *t = Timestamp { secs, nanos };
    }
    let parent = Ino(r.u64());
    Ok(Inode {
        ino: Ino(ino),
        kind,
        perm,
        nlink,
        uid,
        gid,
        size,
        rdev,
        atime: times[0],
        mtime: times[1],
        ctime: times[2],
        crtime: times[3],
        parent,
    })
}

struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
}

/// Reads fixed-size fields; the caller checked the total length up front.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[self.at..self.at + N]);
        self.at += N;
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_inode() -> impl Strategy<Value = Inode> {
        (
            (
                any::<u64>(),
                1u8..=7,
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
            ),
            (
                any::<u64>(),
                any::<u32>(),
                any::<i64>(),
                0u32..1_000_000_000,
                any::<u64>(),
            ),
        )
            .prop_map(
                |((ino, k, perm, nlink, uid, gid), (size, rdev, secs, nanos, parent))| {
                    let t = Timestamp { secs, nanos };
                    Inode {
                        ino: Ino(ino),
                        kind: Kind::from_byte(k).unwrap_or(Kind::File),
                        perm,
                        nlink,
                        uid,
                        gid,
                        size,
                        rdev,
                        atime: t,
                        mtime: t,
                        ctime: t,
                        crtime: t,
                        parent: Ino(parent),
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn inode_roundtrip(inode in any_inode()) {
            let bytes = encode_inode(&inode);
            prop_assert_eq!(decode_inode(inode.ino.0, &bytes), Ok(inode));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = decode_inode(1, &bytes);
        }
    }
}
