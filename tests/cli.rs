//! The `spoolfs mount` / `spoolfs umount` command line: exit codes, messages, options and
//! signals.

mod common;

use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn mounting_over_an_existing_mount_exits_17() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    fs::write(t.path("f"), b"still here").expect("write");
    let out = t.try_mount(&[]);
    assert_eq!(code(&out), Some(17), "{}", describe(&out));
    assert!(
        stderr(&out).contains("already mounted"),
        "{}",
        describe(&out)
    );
    // The first mount is unharmed, and only one spoolfs is mounted there.
    m.assert_healthy();
    assert_eq!(fs::read(t.path("f")).expect("read"), b"still here");
    let n = mounts().iter().filter(|x| x.mount_point == t.mnt).count();
    assert_eq!(n, 1, "mounts stacked at the mountpoint");
    assert_eq!(
        lock_pid(&t.data),
        Some(m.pid),
        "the lock still names the first daemon"
    );
    m.umount();
}

#[test]
fn mountpoint_that_is_not_a_directory_exits_16() {
    let Some(t) = TestFs::new() else { return };
    let file = t.root().join("plain-file");
    fs::write(&file, b"").expect("create");
    let out = spoolfs([
        OsStr::new("mount"),
        OsStr::new("--metrics-addr"),
        OsStr::new("off"),
        t.data.as_os_str(),
        file.as_os_str(),
    ]);
    assert_eq!(code(&out), Some(16), "{}", describe(&out));
    assert!(
        stderr(&out).contains("not a directory"),
        "{}",
        describe(&out)
    );
    let missing = t.root().join("missing");
    let out = spoolfs([
        OsStr::new("mount"),
        OsStr::new("--metrics-addr"),
        OsStr::new("off"),
        t.data.as_os_str(),
        missing.as_os_str(),
    ]);
    assert_eq!(
        code(&out),
        Some(16),
        "missing mountpoint: {}",
        describe(&out)
    );
    assert!(!is_mounted(&file) && !is_mounted(&missing));
}

/// A data dir under the mountpoint: the daemon would stat and open it through its own mount
/// and wait on itself (it did, in `statvfs`, at the first write). Refused before anything is
/// created or mounted.
#[test]
fn a_data_dir_inside_the_mountpoint_exits_2() {
    let Some(t) = TestFs::new() else { return };
    let inside = t.mnt.join("data");
    let out = spoolfs([
        OsStr::new("mount"),
        OsStr::new("--metrics-addr"),
        OsStr::new("off"),
        inside.as_os_str(),
        t.mnt.as_os_str(),
    ]);
    assert_eq!(code(&out), Some(2), "{}", describe(&out));
    assert!(
        stderr(&out).contains("inside the mountpoint"),
        "{}",
        describe(&out)
    );
    assert!(!is_mounted(&t.mnt), "mounted anyway");
    assert!(!inside.exists(), "the refused data dir was created");
}

#[test]
fn second_daemon_on_the_same_data_dir_exits_19_naming_the_pid() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let other = t.root().join("mnt2");
    fs::create_dir(&other).expect("mkdir");
    let out = spoolfs([
        OsStr::new("mount"),
        OsStr::new("--metrics-addr"),
        OsStr::new("off"),
        t.data.as_os_str(),
        other.as_os_str(),
    ]);
    assert_eq!(code(&out), Some(19), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("process {}", m.pid)),
        "message must name PID {}: {err}",
        m.pid
    );
    assert!(
        !is_mounted(&other),
        "the refused daemon must not leave a mount"
    );
    // The running daemon keeps its lock and its mount.
    assert_eq!(lock_pid(&t.data), Some(m.pid));
    m.assert_healthy();
    m.umount();
}

#[test]
fn stale_mount_exits_18_and_says_how_to_clear_it() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    fs::write(t.path("f"), b"durable").expect("write");
    m.kill9();
    assert!(
        is_mounted(&t.mnt),
        "a killed daemon leaves its dead mount behind"
    );
    let out = t.try_mount(&[]);
    assert_eq!(code(&out), Some(18), "{}", describe(&out));
    let err = stderr(&out);
    assert!(
        err.contains("spoolfs umount --lazy") && err.contains(&t.mnt.display().to_string()),
        "the message must say how to clear the dead mount: {err}"
    );
    // Clearing it as told makes the data dir mountable again, with the data intact.
    m.detach();
    let m = t.mount();
    assert_eq!(fs::read(t.path("f")).expect("read"), b"durable");
    m.umount();
}

#[test]
fn umount_of_something_not_mounted_fails() {
    let Some(t) = TestFs::new() else { return };
    let out = spoolfs([OsStr::new("umount"), t.mnt.as_os_str()]);
    assert_eq!(code(&out), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("not mounted"), "{}", describe(&out));
}

#[test]
fn umount_of_a_busy_mount_fails_and_lazy_detaches() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut f = fs::File::create(t.path("busy")).expect("create");
    let out = spoolfs([OsStr::new("umount"), t.mnt.as_os_str()]);
    assert_eq!(code(&out), Some(1), "{}", describe(&out));
    assert!(stderr(&out).contains("busy"), "{}", describe(&out));
    assert!(is_mounted(&t.mnt));
    f.write_all(b"written before the detach").expect("write");
    let out = spoolfs([
        OsStr::new("umount"),
        OsStr::new("--lazy"),
        t.mnt.as_os_str(),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!is_mounted(&t.mnt));
    close_checked(f).expect("close on the detached mount");
    assert!(
        wait_until(Duration::from_secs(10), || !m.alive()),
        "daemon did not exit"
    );
    drop(m);
    let m = t.mount();
    assert_eq!(
        fs::read(t.path("busy")).expect("read"),
        b"written before the detach"
    );
    m.umount();
}

#[test]
fn unknown_or_refused_option_exits_2() {
    let Some(t) = TestFs::new() else { return };
    for opt in ["bogus", "auto_unmount"] {
        let out = t.try_mount(&[opt]);
        assert_eq!(code(&out), Some(2), "-o {opt}: {}", describe(&out));
        assert!(!is_mounted(&t.mnt));
    }
}

#[test]
fn mount_option_sync_makes_every_write_durable() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount_with(&["sync"]);
    let info = mount_at(&t.mnt).expect("mounted");
    assert!(
        info.super_options.split(',').any(|o| o == "sync"),
        "sync not in the mount's options: {}",
        info.super_options
    );
    let mut rng = Rng::new(0x5111C);
    let data = rng.bytes(150_000);
    fs::create_dir(t.path("dir")).expect("mkdir");
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(t.path("dir/f"))
        .expect("create");
    f.write_all(&data).expect("write");
    // No fsync and no close: under -o sync the write's reply already promised durability.
    m.kill9();
    drop(f); // close fails on the dead mount; ignored by drop
    m.detach();
    let m = t.mount();
    assert_bytes_eq(
        &read_all(&t.path("dir/f")).expect("read"),
        &data,
        "dir/f under -o sync",
    );
    m.umount();
}

#[test]
fn mount_option_dirsync_makes_namespace_changes_durable() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount_with(&["dirsync"]);
    let data = Rng::new(0xD125).bytes(10_000);
    let f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(t.path("new"))
        .expect("create");
    std::os::unix::fs::FileExt::write_all_at(&f, &data, 0).expect("write");
    f.sync_all().expect("fsync the content");
    close_checked(f).expect("close");
    // No directory fsync: under -o dirsync each of these is durable when it returns.
    fs::rename(t.path("new"), t.path("renamed")).expect("rename");
    fs::create_dir(t.path("made")).expect("mkdir");
    std::os::unix::fs::symlink("renamed", t.path("made/link")).expect("symlink");
    m.kill9();
    m.detach();
    let m = t.mount();
    assert_bytes_eq(
        &read_all(&t.path("renamed")).expect("read"),
        &data,
        "renamed",
    );
    assert!(!t.path("new").exists());
    assert_eq!(
        fs::read_link(t.path("made/link")).expect("readlink"),
        std::path::Path::new("renamed")
    );
    m.umount();
}

#[test]
fn read_only_mount_refuses_writes() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    fs::write(t.path("f"), b"content").expect("write");
    m.umount();
    let m = t.mount_with(&["ro"]);
    assert_eq!(fs::read(t.path("f")).expect("read"), b"content");
    assert_eq!(
        errno_of(fs::write(t.path("g"), b"x"), "create on ro"),
        libc::EROFS
    );
    assert_eq!(
        errno_of(
            OpenOptions::new().write(true).open(t.path("f")),
            "open for write on ro"
        ),
        libc::EROFS
    );
    assert_eq!(
        errno_of(fs::remove_file(t.path("f")), "unlink on ro"),
        libc::EROFS
    );
    m.assert_healthy();
    m.umount();
}

/// Count of mountinfo lines for `mnt`.
fn mounted_count(mnt: &std::path::Path) -> usize {
    mounts().iter().filter(|m| m.mount_point == mnt).count()
}

#[test]
fn sigterm_unmounts_and_the_background_daemon_exits_cleanly() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let data = Rng::new(0x7E4).bytes(100_000);
    let mut f = fs::File::create(t.path("f")).expect("create");
    f.write_all(&data).expect("write");
    close_checked(f).expect("close");
    signal(m.pid, Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || !m.alive()),
        "daemon still running 10 s after SIGTERM"
    );
    assert_eq!(mounted_count(&t.mnt), 0, "SIGTERM must unmount");
    let log = t.log();
    assert!(log.contains("SIGTERM: unmounting"), "log: {log}");
    assert!(
        log.contains("unmounted; exiting"),
        "the daemon did not finish cleanly: {log}"
    );
    drop(m);
    let m = t.mount();
    assert_bytes_eq(
        &read_all(&t.path("f")).expect("read"),
        &data,
        "after SIGTERM",
    );
    m.umount();
}

/// A foreground daemon that is our own child, so its exit status can be checked.
struct Foreground {
    child: Option<Child>,
}

impl Foreground {
    fn start(t: &TestFs, log: &std::path::Path) -> Foreground {
        let log = fs::File::create(log).expect("create log");
        let mut args = t.mount_args(&[]);
        args.insert(1, "-f".into());
        let child = Command::new(bin())
            .args(&args)
            .env_remove("SPOOLFS_DAEMON_CHILD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn spoolfs mount -f");
        let fg = Foreground { child: Some(child) };
        assert!(
            wait_until(Duration::from_secs(10), || mount_at(&t.mnt)
                .is_some_and(|m| m.fs_type == "fuse.spoolfs")),
            "foreground mount did not appear"
        );
        fg
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("child")
    }

    /// Wait (with a timeout) for the exit status.
    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        if status.is_some() {
            self.child = None;
        }
        status
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn sigterm_to_a_foreground_daemon_exits_0() {
    let Some(t) = TestFs::new() else { return };
    let log = t.root().join("fg.log");
    let mut fg = Foreground::start(&t, &log);
    let data = Rng::new(0xF6).bytes(70_000);
    fs::write(t.path("f"), &data).expect("write");
    signal(fg.pid(), Signal::SIGTERM);
    let status = fg
        .wait(Duration::from_secs(10))
        .expect("daemon exits after SIGTERM");
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM; log:\n{text}"
    );
    assert_eq!(mounted_count(&t.mnt), 0, "SIGTERM must unmount");
    let m = t.mount();
    assert_bytes_eq(
        &read_all(&t.path("f")).expect("read"),
        &data,
        "after SIGTERM",
    );
    m.umount();
}

#[test]
fn sigterm_with_a_busy_mount_detaches_and_exits_0_after_the_last_close() {
    let Some(t) = TestFs::new() else { return };
    let log = t.root().join("fg.log");
    let mut fg = Foreground::start(&t, &log);
    let mut f = fs::File::create(t.path("open")).expect("create");
    f.write_all(b"first ").expect("write");
    signal(fg.pid(), Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(10), || mounted_count(&t.mnt) == 0),
        "a busy mount must be detached on SIGTERM"
    );
    // The open file is still served.
    f.write_all(b"second").expect("write after the detach");
    assert!(
        fg.wait(Duration::from_millis(200)).is_none(),
        "exited while a file was open"
    );
    close_checked(f).expect("close");
    let status = fg
        .wait(Duration::from_secs(10))
        .expect("daemon exits after the last close");
    assert_eq!(
        status.code(),
        Some(0),
        "log:\n{}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    let m = t.mount();
    assert_eq!(fs::read(t.path("open")).expect("read"), b"first second");
    m.umount();
}
