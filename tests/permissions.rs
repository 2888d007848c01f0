//! Permission checks as other users see them (the mount is `allow_other` and
//! `default_permissions` when mounted by root): the kernel enforces the mode bits the
//! daemon stores. Each check runs a small shell command as another uid.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use common::*;

const ALICE: u32 = 20001;
const BOB: u32 = 20002;

/// Run `sh -c script` as `uid` (group = uid, no supplementary groups: std drops them when
/// root sets a uid) in `dir`; true if it exited 0.
fn run_as(uid: u32, dir: &Path, script: &str) -> bool {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .uid(uid)
        .gid(uid)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("run sh as another user")
        .status
        .success()
}

#[test]
fn other_users_are_held_to_the_mode_bits() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let dir = &t.mnt;
    fs::write(t.path("root_file"), b"secret-ish\n").expect("write");
    fs::set_permissions(t.path("root_file"), fs::Permissions::from_mode(0o644)).expect("chmod");
    fs::write(t.path("private"), b"private\n").expect("write");
    fs::set_permissions(t.path("private"), fs::Permissions::from_mode(0o600)).expect("chmod");

    assert!(
        run_as(ALICE, dir, "cat root_file >/dev/null"),
        "0644 is readable by others"
    );
    assert!(
        !run_as(ALICE, dir, "echo x >> root_file"),
        "0644 is not writable by others"
    );
    assert!(
        !run_as(ALICE, dir, "cat private >/dev/null"),
        "0600 is not readable by others"
    );
    assert!(
        !run_as(ALICE, dir, "echo x > new_in_root_dir"),
        "a 0755 root dir refuses creates"
    );
    assert_eq!(
        fs::read(t.path("root_file")).expect("read"),
        b"secret-ish\n"
    );

    // A world-writable sticky directory, like a spool's queue: everyone creates, but only
    // the owner removes or renames.
    fs::create_dir(t.path("spool")).expect("mkdir");
    fs::set_permissions(t.path("spool"), fs::Permissions::from_mode(0o1777)).expect("chmod");
    let spool = t.path("spool");
    assert!(
        run_as(ALICE, &spool, "echo alice > a && chmod 600 a"),
        "alice creates"
    );
    let meta = fs::metadata(spool.join("a")).expect("stat");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (ALICE, ALICE, 0o600)
    );
    assert!(run_as(BOB, &spool, "echo bob > b"), "bob creates");
    assert!(
        !run_as(BOB, &spool, "cat a >/dev/null"),
        "bob cannot read alice's 0600 file"
    );
    assert!(
        !run_as(BOB, &spool, "rm -f a && test ! -e a"),
        "sticky: bob cannot remove alice's file"
    );
    assert!(
        !run_as(BOB, &spool, "mv a stolen"),
        "sticky: bob cannot rename alice's file"
    );
    assert!(run_as(ALICE, &spool, "rm a"), "alice removes her own file");
    assert!(
        !run_as(BOB, &spool, "chmod 666 b && chown 20001 b"),
        "chown needs root"
    );
    assert!(run_as(BOB, &spool, "chmod 640 b"), "the owner may chmod");
    assert_eq!(
        fs::metadata(spool.join("b")).expect("stat").mode() & 0o7777,
        0o640
    );

    // A setgid directory hands its group down.
    fs::create_dir(t.path("shared")).expect("mkdir");
    std::os::unix::fs::chown(t.path("shared"), Some(0), Some(4242)).expect("chgrp");
    fs::set_permissions(t.path("shared"), fs::Permissions::from_mode(0o2777)).expect("chmod");
    assert!(
        run_as(ALICE, &t.path("shared"), "echo x > f && mkdir d"),
        "alice creates"
    );
    assert_eq!(fs::metadata(t.path("shared/f")).expect("stat").gid(), 4242);
    let d = fs::metadata(t.path("shared/d")).expect("stat");
    assert_eq!(d.gid(), 4242);
    assert_ne!(d.mode() & 0o2000, 0, "subdirectories inherit setgid");
    m.assert_healthy();
    m.umount();

    // Ownership and modes persist.
    let m = t.mount();
    let meta = fs::metadata(t.path("spool/b")).expect("stat");
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (BOB, 0o640));
    assert!(
        !run_as(ALICE, &t.mnt, "cat private >/dev/null"),
        "still private after restart"
    );
    m.umount();
}

/// The filesystem drops set-ID bits itself (`FUSE_HANDLE_KILLPRIV_V2`, which spares a
/// getxattr round trip before every write): a write or truncate by a user without
/// CAP_FSETID clears set-user-ID and (with group execute) set-group-ID, every time, not only
/// the first; root's writes keep them; chown clears them whoever does it.
#[test]
fn set_id_bits_are_dropped_on_write_truncate_and_chown() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mode = |name: &str| fs::metadata(t.path(name)).expect("stat").mode() & 0o7777;
    let setup = |name: &str, perm: u32| {
        fs::write(t.path(name), b"#!/bin/sh\n").expect("write");
        std::os::unix::fs::chown(t.path(name), Some(ALICE), Some(ALICE)).expect("chown");
        fs::set_permissions(t.path(name), fs::Permissions::from_mode(perm)).expect("chmod");
    };
    fs::set_permissions(&t.mnt, fs::Permissions::from_mode(0o777)).expect("chmod root");

    setup("w", 0o6775);
    assert!(run_as(ALICE, &t.mnt, "echo more >> w"), "owner appends");
    assert_eq!(
        mode("w"),
        0o775,
        "a write by the owner drops both set-ID bits"
    );
    // Again after the first write (the kernel marks the inode S_NOSEC then): still dropped.
    fs::set_permissions(t.path("w"), fs::Permissions::from_mode(0o4775)).expect("chmod");
    assert!(
        run_as(ALICE, &t.mnt, "echo again >> w"),
        "owner appends again"
    );
    assert_eq!(mode("w"), 0o775, "the second write drops set-user-ID too");

    setup("nogx", 0o2764);
    assert!(run_as(ALICE, &t.mnt, "echo more >> nogx"), "owner appends");
    assert_eq!(
        mode("nogx"),
        0o2764,
        "set-group-ID without group execute (mandatory locking) stays"
    );

    setup("rootw", 0o6755);
    fs::OpenOptions::new()
        .append(true)
        .open(t.path("rootw"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"root\n"))
        .expect("root appends");
    assert_eq!(mode("rootw"), 0o6755, "root (CAP_FSETID) keeps the bits");

    setup("tr", 0o6775);
    assert!(run_as(ALICE, &t.mnt, "truncate -s 1 tr"), "owner truncates");
    assert_eq!(
        mode("tr"),
        0o775,
        "a truncate by the owner drops both set-ID bits"
    );

    setup("ch", 0o6775);
    std::os::unix::fs::chown(t.path("ch"), Some(BOB), None).expect("chown");
    assert_eq!(mode("ch"), 0o775, "chown drops both set-ID bits");

    fs::create_dir(t.path("d")).expect("mkdir");
    fs::set_permissions(t.path("d"), fs::Permissions::from_mode(0o2775)).expect("chmod");
    std::os::unix::fs::chown(t.path("d"), Some(ALICE), None).expect("chown dir");
    assert_eq!(
        mode("d"),
        0o2775,
        "a directory keeps set-group-ID across chown"
    );
    m.umount();
}
