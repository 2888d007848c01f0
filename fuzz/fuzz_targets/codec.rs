//! Inode records from arbitrary bytes: the first 8 bytes are the inode number, the rest the
//! record. Decoding never panics; a record that decodes encodes back to the same bytes, and
//! decoding that gives the same inode.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spoolfs_store::codec::{decode_inode, encode_inode, INODE_RECORD_LEN};

fuzz_target!(|data: &[u8]| {
    let (ino, record) = match data.split_first_chunk::<8>() {
        Some((ino, rest)) => (u64::from_le_bytes(*ino), rest),
        None => (1, data),
    };
    let Ok(inode) = decode_inode(ino, record) else {
        return;
    };
    assert_eq!(record.len(), INODE_RECORD_LEN);
    assert_eq!(inode.ino.0, ino);
    let bytes = encode_inode(&inode);
    assert_eq!(&bytes[..], record, "re-encoding changed the record");
    assert_eq!(
        decode_inode(ino, &bytes),
        Ok(inode),
        "decoding is not stable"
    );
});
