//! Model-based test of the pure core: random operation sequences applied to `Fs` + `MemStore`
//! and to an independent reference model (`harness::model`), comparing every answer and the
//! whole state after every operation. See `harness/mod.rs` for the design.
//!
//! The run is deterministic: a fixed seed and a fixed number of cases. Environment overrides:
//! `PROPTEST_CASES` (number of sequences) and `SPOOLFS_MODEL_SEED` (any u64) to explore
//! further; `SPOOLFS_MODEL_STATS=1` (with `--nocapture`) prints how often each request ended
//! with which errno, to check the generator still reaches every case. A failure is shrunk to
//! a minimal sequence, printed in Rust syntax: paste it into a `#[test]` below as a
//! regression test.

mod harness;

use std::collections::BTreeMap;
use std::sync::Mutex;

use proptest::test_runner::{TestCaseError, TestRunner};
use spoolfs_core::{MemStore, CHUNK_SIZE};

use harness::driver::Driver;
use harness::model::Model;
use harness::ops::Loc::*;
use harness::ops::Op::*;
use harness::ops::Ref::*;
#[allow(unused_imports)]
use harness::ops::Sel::*;
use harness::ops::{ops, Op, Path, Ref};
use harness::sut::Sut;

/// Default number of sequences. With 1..=400 operations each (the lower bound lets a failure
/// shrink to a single operation) that is about 16,000 operations per `cargo test`; the test
/// asserts at least 10,000.
const CASES: u32 = 80;
const SEED: u64 = 0x0590_01f5;

fn cases() -> u32 {
    harness::env_or("PROPTEST_CASES", CASES)
}

fn seed() -> u64 {
    harness::env_or("SPOOLFS_MODEL_SEED", SEED)
}

fn runner(cases: u32, seed: u64) -> TestRunner {
    harness::seeded_runner(cases, seed, 10_000)
}

/// Apply `ops` to the model and to `Fs` + `MemStore`; the first difference, with its step.
/// On success, how each request ended, and how many operations ran.
fn check(ops: &[Op]) -> Result<(BTreeMap<String, usize>, usize), String> {
    let mut d = Driver::new(Model::new(), Sut::new(MemStore::default()));
    d.run(ops)?;
    Ok((d.stats, d.applied))
}

fn replay(ops: &[Op]) {
    if let Err(e) = check(ops) {
        panic!("{e}");
    }
}

#[test]
fn random_sequences_match_the_model() {
    let totals = Mutex::new((BTreeMap::<String, usize>::new(), 0usize));
    let cases = cases();
    let mut runner = runner(cases, seed());
    let result = runner.run(&ops(1..=400), |ops| {
        let (stats, n) = check(&ops).map_err(TestCaseError::fail)?;
        let mut t = totals.lock().expect("totals");
        for (k, v) in stats {
            *t.0.entry(k).or_insert(0) += v;
        }
        t.1 += n;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (stats, total) = totals.into_inner().expect("totals");
    eprintln!("model test: {cases} sequences, {total} operations");
    if std::env::var_os("SPOOLFS_MODEL_STATS").is_some() {
        for (k, v) in &stats {
            eprintln!("  {k:<28} {v}");
        }
    }
    if cases >= CASES {
        assert!(total >= 10_000, "only {total} operations ran");
    }
}

// --- regression tests: shrunk failures, replayed as they were found ----------------------

/// `Loc::In(root(), n)`: the name `NAMES[n]` in the root directory.
fn root() -> Ref {
    At(Path::of(&[]))
}

/// Smoke test of the harness itself: a little of everything, by hand.
#[test]
fn handwritten_tour() {
    replay(&[
        Mkdir {
            at: In(root(), 0),
            mode: 2,
        },
        Create {
            at: In(At(Path::of(&[0])), 1),
            mode: 0,
            acc: 2,
        },
        Write {
            h: 0,
            offset: 65_500,
            len: 100,
            seed: 3,
        },
        Link {
            src: At(Path::of(&[0, 1])),
            at: In(root(), 2),
        },
        Unlink {
            at: In(At(Path::of(&[0])), 1),
        },
        Rename {
            from: In(root(), 2),
            to: In(root(), 0),
            flags: 0,
        },
        Unlink { at: In(root(), 2) },
        Read {
            h: 0,
            offset: 65_400,
            len: 300,
        },
        Rmdir { at: In(root(), 0) },
        Release { h: 0 },
        ForgetAll,
    ]);
}

/// Every range between points at and around chunk boundaries, for each fallocate mode and
/// for truncate + write, on a file full of data: exact boundary cases that random offsets
/// rarely hit (a punch leaving one byte of a chunk, a truncate to one byte short of one).
#[test]
fn chunk_boundary_ranges() {
    const C: u64 = CHUNK_SIZE;
    let points = [0, 1, C - 1, C, C + 1, 2 * C - 1, 2 * C, 2 * C + 1, 3 * C];
    let full = (3 * C + 5) as u32;
    for &start in &points {
        for &end in points.iter().filter(|e| **e > start) {
            for mode in 0..3 {
                replay(&[
                    Create {
                        at: In(root(), 0),
                        mode: 0,
                        acc: 2,
                    },
                    Write {
                        h: 0,
                        offset: 0,
                        len: full,
                        seed: 1,
                    },
                    Fallocate {
                        h: 0,
                        offset: start,
                        len: end - start,
                        mode,
                    },
                    Read {
                        h: 0,
                        offset: start.saturating_sub(2),
                        len: 5,
                    },
                    Read {
                        h: 0,
                        offset: end.saturating_sub(2),
                        len: 5,
                    },
                ]);
            }
            replay(&[
                Create {
                    at: In(root(), 0),
                    mode: 0,
                    acc: 2,
                },
                Write {
                    h: 0,
                    offset: 0,
                    len: full,
                    seed: 2,
                },
                Ftruncate { h: 0, size: start },
                Ftruncate { h: 0, size: end },
                Write {
                    h: 0,
                    offset: end,
                    len: 3,
                    seed: 3,
                },
                Read {
                    h: 0,
                    offset: start.saturating_sub(2),
                    len: 5,
                },
            ]);
        }
    }
}

/// A zero-length write past the end of the file extended the file to the write's offset.
#[test]
fn zero_length_write_past_eof_keeps_size() {
    replay(&[
        Create {
            at: In(root(), 0),
            mode: 0,
            acc: 28,
        },
        Write {
            h: 0,
            offset: 1,
            len: 0,
            seed: 0,
        },
    ]);
}

/// Linking a directory onto an existing name answered EPERM; linkat(2) checks the new name
/// first (EEXIST).
#[test]
fn link_directory_onto_existing_name_is_eexist() {
    replay(&[
        Mkdir {
            at: In(root(), 0),
            mode: 0,
        },
        Link {
            src: root(),
            at: In(root(), 0),
        },
    ]);
}

/// Renaming a file onto a directory that contains it (here its grandparent) answered EISDIR;
/// Linux's lock_rename trap answers ENOTEMPTY before looking at the kinds.
#[test]
fn rename_file_over_its_ancestor_is_enotempty() {
    replay(&[
        Mkdir {
            at: In(root(), 0),
            mode: 0,
        },
        Mkdir {
            at: In(At(Path::of(&[0])), 1),
            mode: 0,
        },
        Create {
            at: In(At(Path::of(&[0, 1])), 2),
            mode: 0,
            acc: 2,
        },
        Rename {
            from: In(At(Path::of(&[0, 1])), 2),
            to: In(root(), 0),
            flags: 0,
        },
    ]);
}

/// Moving a directory into its own subtree over an existing file answered ENOTDIR; the
/// subtree check comes first (EINVAL).
#[test]
fn rename_directory_into_own_subtree_over_a_file_is_einval() {
    replay(&[
        Mkdir {
            at: In(root(), 0),
            mode: 0,
        },
        Mkdir {
            at: In(At(Path::of(&[0])), 1),
            mode: 0,
        },
        Create {
            at: In(At(Path::of(&[0, 1])), 2),
            mode: 0,
            acc: 2,
        },
        Rename {
            from: In(root(), 0),
            to: In(At(Path::of(&[0, 1])), 2),
            flags: 0,
        },
    ]);
}

/// Renaming into a directory that was removed while still open succeeded: the entry could
/// never be removed again and leaked (with its inode) when the directory was reclaimed.
#[test]
fn rename_into_removed_directory_is_enoent() {
    replay(&[
        Mkdir {
            at: In(root(), 0),
            mode: 0,
        },
        OpenDir {
            target: At(Path::of(&[0])),
        },
        Rmdir { at: In(root(), 0) },
        Create {
            at: In(root(), 1),
            mode: 0,
            acc: 2,
        },
        Rename {
            from: In(root(), 1),
            to: In(Handle(0), 2),
            flags: 0,
        },
        Rename {
            from: In(root(), 1),
            to: In(Handle(0), 2),
            flags: 1,
        },
        Release { h: 0 },
        ForgetAll,
    ]);
}
