//! Write-ahead logs from arbitrary bytes. An even first byte frames the rest as one entry
//! body with a valid checksum (so the record decoder sees arbitrary bytes); otherwise the rest
//! is a whole log. Parsing never panics (every length and tag is bounds-checked), and what
//! parses, encoded again, parses to the same records (replay applies what was written).

#![no_main]

use libfuzzer_sys::fuzz_target;
use spoolfs_store::wal::{encode_entry, frame, parse};

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let mut framed = Vec::new();
    let log = if mode % 2 == 0 {
        frame(&mut framed, 0, 0, rest);
        &framed[..]
    } else {
        rest
    };
    let (deltas, next) = parse(log, 0, 0);
    assert_eq!(next, deltas.len() as u64);
    let mut again = Vec::new();
    for (seq, delta) in deltas.iter().enumerate() {
        encode_entry(&mut again, seq as u64, 0, delta);
    }
    let (reparsed, _) = parse(&again, 0, 0);
    assert_eq!(reparsed.len(), deltas.len(), "re-encoded log parses differently");
    for (a, b) in deltas.iter().zip(&reparsed) {
        assert!(a.records().eq(b.records()), "re-encoded entry differs");
    }
});
