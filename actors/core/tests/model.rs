//! Model-based test of the pure core: random operation sequences applied to `Fs` + `MemStore`
//! and to an independent reference model (`harness::model`), comparing every answer and the
//! whole state after every operation. See `harness/mod.rs` for the design.
//!
//! The run is deterministic: a fixed seed and a fixed number of cases. Environment overrides:
//! `PROPTEST_CASES` (number of sequences) and `SPOOLFS_MODEL_SEED` (any u64) to explore
//! further. A failure is shrunk to a minimal sequence, printed in Rust syntax: paste it into
//! a `#[test]` below as a regression test.

mod harness;

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use spoolfs_core::MemStore;

use harness::driver::Driver;
use harness::model::Model;
use harness::ops::{ops, Op, Path, Ref};
use harness::sut::Sut;

/// Default number of sequences; with 1..=320 operations each (the lower bound lets
/// failures shrink to a single operation) that is about 10,000
/// operations per `cargo test`.
const CASES: u32 = 64;
const SEED: u64 = 0x5900_1f5;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES)
}

fn seed() -> u64 {
    std::env::var("SPOOLFS_MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SEED)
}

pub fn runner(cases: u32, seed: u64) -> TestRunner {
    let config = Config {
        cases,
        // Shrunk failures become named regression tests instead of a persistence file.
        failure_persistence: None,
        max_shrink_iters: 10_000,
        ..Config::default()
    };
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

/// Apply `ops` to the model and to `Fs` + `MemStore`; the first difference, with its step.
fn check(ops: &[Op]) -> Result<usize, String> {
    let mut d = Driver::new(Model::new(), Sut::new(MemStore::default()));
    d.run(ops)?;
    Ok(d.applied)
}

fn replay(ops: &[Op]) {
    if let Err(e) = check(ops) {
        panic!("{e}");
    }
}

#[test]
fn random_sequences_match_the_model() {
    let total = AtomicUsize::new(0);
    let cases = cases();
    let mut runner = runner(cases, seed());
    let result = runner.run(&ops(1..=320), |ops| {
        let n = check(&ops).map_err(TestCaseError::fail)?;
        total.fetch_add(n, Ordering::Relaxed);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let total = total.load(Ordering::Relaxed);
    eprintln!("model test: {cases} sequences, {total} operations");
    if cases >= CASES {
        assert!(total >= 10_000, "only {total} operations ran");
    }
}

// --- regression tests: shrunk failures, replayed as they were found ----------------------

/// Smoke test of the harness itself: a little of everything, by hand.
#[test]
fn handwritten_tour() {
    let root = || Ref::Path(Path::of(&[]));
    replay(&[
        Op::Mkdir { dir: root(), name: 0, mode: 2 },
        Op::Create { dir: Ref::Path(Path::of(&[0])), name: 1, mode: 0, acc: 2 },
        Op::Write { h: 0, offset: 65_500, len: 100, seed: 3 },
        Op::Link { src: Ref::Path(Path::of(&[0, 1])), dir: root(), name: 2 },
        Op::Unlink { dir: Ref::Path(Path::of(&[0])), name: 1 },
        Op::Rename { dir: root(), name: 2, new_dir: root(), new_name: 0, flags: 0 },
        Op::Unlink { dir: root(), name: 2 },
        Op::Read { h: 0, offset: 65_400, len: 300 },
        Op::Rmdir { dir: root(), name: 0 },
        Op::Release { h: 0 },
        Op::ForgetAll,
    ]);
}

/// A zero-length write past the end of the file extended the file to the write's offset.
#[test]
fn zero_length_write_past_eof_keeps_size() {
    replay(&[
        Op::Create { dir: Ref::Path(Path::of(&[])), name: 0, mode: 0, acc: 28 },
        Op::Write { h: 0, offset: 1, len: 0, seed: 0 },
    ]);
}

/// Linking a directory onto an existing name answered EPERM; linkat(2) checks the new name
/// first (EEXIST).
#[test]
fn link_directory_onto_existing_name_is_eexist() {
    let root = || Ref::Path(Path::of(&[]));
    replay(&[
        Op::Mkdir { dir: root(), name: 0, mode: 0 },
        Op::Link { src: root(), dir: root(), name: 0 },
    ]);
}
