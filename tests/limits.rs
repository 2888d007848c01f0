//! Limits and error cases answered with the precise errno, the daemon alive afterwards.
//! (Some of these the kernel answers before the request reaches the daemon; the test checks
//! what an application sees.)

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{symlink, FileExt, MetadataExt};
use std::path::Path;

use common::*;

const CHUNK: u64 = spoolfs_core::CHUNK_SIZE;
/// The largest file spoolfs stores (Limits::file_size_max): 16 TiB.
const FILE_SIZE_MAX: u64 = 1 << 44;

#[test]
fn names_longer_than_255_bytes() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let long = "n".repeat(256);
    let ok = "n".repeat(255);
    let p = t.path(&long);
    assert_eq!(
        errno_of(File::create(&p), "create 256-byte name"),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno_of(fs::create_dir(&p), "mkdir 256-byte name"),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno_of(symlink("x", &p), "symlink 256-byte name"),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno_of(fs::metadata(&p), "stat 256-byte name"),
        libc::ENAMETOOLONG
    );
    fs::write(t.path(&ok), b"255").expect("a 255-byte name is fine");
    assert_eq!(
        errno_of(fs::rename(t.path(&ok), &p), "rename to 256-byte name"),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno_of(fs::hard_link(t.path(&ok), &p), "link to 256-byte name"),
        libc::ENAMETOOLONG
    );
    assert_eq!(fs::read(t.path(&ok)).expect("read"), b"255");
    // Multi-byte UTF-8: the limit is in bytes (128 two-byte characters = 256 bytes).
    assert_eq!(
        errno_of(File::create(t.path(&"é".repeat(128))), "256 bytes of UTF-8"),
        libc::ENAMETOOLONG
    );
    File::create(t.path(&format!("{}x", "é".repeat(127)))).expect("255 bytes of UTF-8");
    m.assert_healthy();
    m.umount();
}

#[test]
fn file_size_limits_give_efbig() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(t.path("big"))
        .expect("create");
    f.write_all_at(b"head", 0).expect("write");

    assert_eq!(
        errno_of(f.write_at(b"x", 1 << 62), "pwrite at 2^62"),
        libc::EFBIG
    );
    assert_eq!(
        errno_of(f.set_len(i64::MAX as u64), "ftruncate to 2^63-1"),
        libc::EFBIG
    );
    assert_eq!(
        errno_of(f.set_len(FILE_SIZE_MAX + 1), "ftruncate past the max"),
        libc::EFBIG
    );
    assert_eq!(
        errno_of(
            fallocate(&f, 0, (FILE_SIZE_MAX - 10) as i64, 100),
            "fallocate past the max"
        ),
        libc::EFBIG
    );
    assert_eq!(
        errno_of(fallocate(&f, 0, i64::MAX - 10, 100), "fallocate past 2^63"),
        libc::EFBIG
    );
    assert_eq!(
        errno_of(
            fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 1i64 << 62, 4096),
            "fallocate KEEP_SIZE at 2^62"
        ),
        libc::EFBIG
    );
    assert_eq!(
        errno_of(
            f.write_at(b"x", FILE_SIZE_MAX),
            "pwrite one byte past the max"
        ),
        libc::EFBIG
    );
    // Nothing changed by the refused calls.
    assert_eq!(f.metadata().expect("fstat").len(), 4);

    // Right up to the limit is allowed (a sparse file: one stored chunk).
    f.write_all_at(b"z", FILE_SIZE_MAX - 1)
        .expect("write the last allowed byte");
    assert_eq!(f.metadata().expect("fstat").len(), FILE_SIZE_MAX);
    let mut b = [0u8; 2];
    assert_eq!(
        f.read_at(&mut b, FILE_SIZE_MAX - 1)
            .expect("read last byte"),
        1
    );
    assert_eq!(b[0], b'z');
    assert_eq!(
        lseek(&f, 0, libc::SEEK_HOLE).expect("SEEK_HOLE"),
        CHUNK as i64
    );
    assert_eq!(
        lseek(&f, CHUNK as i64, libc::SEEK_DATA).expect("SEEK_DATA"),
        // the start of the chunk holding the last byte
        ((FILE_SIZE_MAX - 1) / CHUNK * CHUNK) as i64
    );
    f.set_len(4).expect("truncate back");
    let mut head = [0u8; 8];
    assert_eq!(f.read_at(&mut head, 0).expect("read"), 4);
    assert_eq!(&head[..4], b"head");
    close_checked(f).expect("close");
    m.assert_healthy();
    m.umount();
}

#[test]
fn symlink_target_limits() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    assert_eq!(
        errno_of(
            symlink("t".repeat(4096), t.path("too_long")),
            "4096-byte target"
        ),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno_of(
            symlink("t".repeat(10_000), t.path("too_long")),
            "10000-byte target"
        ),
        libc::ENAMETOOLONG
    );
    let target = format!("/{}", "d/".repeat(2047));
    assert_eq!(target.len(), 4095);
    symlink(&target, t.path("longest")).expect("a 4095-byte target is fine");
    assert_eq!(
        fs::read_link(t.path("longest")).expect("readlink"),
        Path::new(&target)
    );
    assert_eq!(
        fs::symlink_metadata(t.path("longest"))
            .expect("lstat")
            .len(),
        4095
    );
    assert_eq!(
        errno_of(fs::metadata(t.path("too_long")), "stat"),
        libc::ENOENT
    );
    m.assert_healthy();
    m.umount();
}

#[test]
fn xattr_limits_and_size_probe() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let p = t.path("f");
    fs::write(&p, b"x").expect("create");

    // Values: 64 KiB is the most.
    assert_eq!(
        errno_of(
            setxattr(&p, b"user.big", &vec![7u8; 65537], 0),
            "value of 64 KiB + 1"
        ),
        libc::E2BIG
    );
    assert_eq!(
        errno_of(
            setxattr(&p, b"user.big", &vec![7u8; 1 << 20], 0),
            "value of 1 MiB"
        ),
        libc::E2BIG
    );
    setxattr(&p, b"user.big", &vec![7u8; 65536], 0).expect("a 64 KiB value is fine");
    assert_eq!(getxattr(&p, b"user.big").expect("get").len(), 65536);

    // Names: 255 bytes is the most.
    let long_name = format!("user.{}", "k".repeat(251));
    assert_eq!(long_name.len(), 256);
    assert_eq!(
        errno_of(
            setxattr(&p, long_name.as_bytes(), b"v", 0),
            "256-byte xattr name"
        ),
        libc::ERANGE
    );
    assert_eq!(
        errno_of(
            getxattr_sized(&p, long_name.as_bytes(), 10),
            "get 256-byte name"
        ),
        libc::ERANGE
    );
    let max_name = &long_name[..255];
    setxattr(&p, max_name.as_bytes(), b"v", 0).expect("a 255-byte name is fine");
    assert_eq!(getxattr(&p, max_name.as_bytes()).expect("get"), b"v");

    // Namespaces other than user., trusted., security.
    assert_eq!(
        errno_of(setxattr(&p, b"foo.bar", b"v", 0), "set foo.bar"),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        errno_of(getxattr_sized(&p, b"foo.bar", 10), "get foo.bar"),
        libc::EOPNOTSUPP
    );

    // Size probe: size 0 returns the length; a short buffer is ERANGE.
    let value = b"0123456789abcdef";
    setxattr(&p, b"user.probe", value, 0).expect("set");
    let (len, _) = getxattr_sized(&p, b"user.probe", 0).expect("probe");
    assert_eq!(len, value.len());
    assert_eq!(
        errno_of(
            getxattr_sized(&p, b"user.probe", value.len() - 1),
            "short buffer"
        ),
        libc::ERANGE
    );
    let (n, v) = getxattr_sized(&p, b"user.probe", value.len()).expect("exact buffer");
    assert_eq!((n, v.as_slice()), (value.len(), &value[..]));
    let (n, v) = getxattr_sized(&p, b"user.probe", 4096).expect("large buffer");
    assert_eq!((n, v.as_slice()), (value.len(), &value[..]));
    // An empty value: length 0 either way.
    setxattr(&p, b"user.empty", b"", 0).expect("set empty");
    assert_eq!(getxattr_sized(&p, b"user.empty", 0).expect("probe").0, 0);
    assert_eq!(getxattr_sized(&p, b"user.empty", 10).expect("get").0, 0);

    // listxattr has the same protocol.
    let names = listxattr(&p).expect("list");
    let expected: Vec<Vec<u8>> = {
        let mut v = vec![
            b"user.big".to_vec(),
            max_name.as_bytes().to_vec(),
            b"user.probe".to_vec(),
            b"user.empty".to_vec(),
        ];
        v.sort();
        v
    };
    assert_eq!(names, expected);
    let path = cstr(&p);
    let mut small = [0u8; 4];
    // SAFETY: `small` has 4 writable bytes.
    let r = unsafe { libc::listxattr(path.as_ptr(), small.as_mut_ptr().cast(), small.len()) };
    assert_eq!(
        (r, last_errno()),
        (-1, libc::ERANGE),
        "listxattr into a short buffer"
    );

    // Flags and missing names.
    assert_eq!(
        errno_of(
            setxattr(&p, b"user.probe", b"x", libc::XATTR_CREATE),
            "XATTR_CREATE on existing"
        ),
        libc::EEXIST
    );
    assert_eq!(
        errno_of(
            setxattr(&p, b"user.nope", b"x", libc::XATTR_REPLACE),
            "XATTR_REPLACE on missing"
        ),
        libc::ENODATA
    );
    assert_eq!(
        errno_of(getxattr(&p, b"user.nope"), "get missing"),
        libc::ENODATA
    );
    assert_eq!(getxattr(&p, b"user.probe").expect("unchanged"), value);
    m.assert_healthy();
    m.umount();
}

#[test]
fn namespace_errors() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    fs::create_dir_all(t.path("a/b/c")).expect("mkdir -p");
    fs::write(t.path("a/file"), b"file").expect("write");

    assert_eq!(
        errno_of(
            fs::rename(t.path("a"), t.path("a/b/c/a")),
            "rename dir into its subtree"
        ),
        libc::EINVAL
    );
    assert_eq!(
        errno_of(
            fs::rename(t.path("a"), t.path("a/x")),
            "rename dir into itself"
        ),
        libc::EINVAL
    );
    assert_eq!(
        errno_of(fs::remove_dir(t.path("a")), "rmdir non-empty"),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno_of(fs::remove_dir(t.path("a/b")), "rmdir non-empty"),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno_of(
            fs::hard_link(t.path("a/b"), t.path("blink")),
            "link to a dir"
        ),
        libc::EPERM
    );
    assert_eq!(
        errno_of(fs::remove_dir(t.path("a/file")), "rmdir a file"),
        libc::ENOTDIR
    );
    assert_eq!(
        errno_of(fs::remove_file(t.path("a/b")), "unlink a dir"),
        libc::EISDIR
    );
    assert_eq!(
        errno_of(fs::create_dir(t.path("a/b")), "mkdir existing"),
        libc::EEXIST
    );
    assert_eq!(
        errno_of(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(t.path("a/file")),
            "O_EXCL on existing"
        ),
        libc::EEXIST
    );
    assert_eq!(
        errno_of(fs::rename(t.path("a/file"), t.path("a/b")), "file over dir"),
        libc::EISDIR
    );
    assert_eq!(
        errno_of(fs::rename(t.path("a/b"), t.path("a/file")), "dir over file"),
        libc::ENOTDIR
    );
    fs::create_dir(t.path("other")).expect("mkdir");
    assert_eq!(
        errno_of(
            fs::rename(t.path("other"), t.path("a")),
            "dir over non-empty dir"
        ),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno_of(File::open(t.path("a/file/x")), "path through a file"),
        libc::ENOTDIR
    );
    assert_eq!(
        errno_of(fs::read_dir(t.path("missing")), "missing dir"),
        libc::ENOENT
    );
    // rename between two links of one inode does nothing and succeeds (POSIX).
    fs::hard_link(t.path("a/file"), t.path("a/file2")).expect("link");
    fs::rename(t.path("a/file"), t.path("a/file2")).expect("rename onto another link");
    assert!(t.path("a/file").exists() && t.path("a/file2").exists());
    assert_eq!(fs::metadata(t.path("a/file")).expect("stat").nlink(), 2);
    fs::remove_file(t.path("a/file2")).expect("unlink");
    let sv = nix::sys::statvfs::statvfs(&t.mnt).expect("statvfs");
    assert_eq!(sv.name_max(), 255, "statfs f_namemax");
    // Everything is as before the failed calls.
    assert_eq!(fs::read(t.path("a/file")).expect("read"), b"file");
    assert!(t.path("a/b/c").is_dir());
    assert_eq!(
        fs::metadata(t.path("a")).expect("stat").nlink(),
        3,
        "a holds b: 2 + 1"
    );
    m.assert_healthy();
    m.umount();
}

#[test]
fn rename_noreplace_and_exchange() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    fs::create_dir_all(t.path("d1/sub")).expect("mkdir");
    fs::create_dir(t.path("d2")).expect("mkdir");
    fs::write(t.path("x"), b"x content").expect("write");
    fs::write(t.path("y"), b"y content").expect("write");
    fs::write(t.path("d2/z"), b"z content").expect("write");
    let ino = |r: &str| fs::symlink_metadata(t.path(r)).expect("stat").ino();
    let (ix, iy, isub) = (ino("x"), ino("y"), ino("d1/sub"));

    // RENAME_NOREPLACE onto an existing name: EEXIST, both untouched.
    assert_eq!(
        errno_of(
            renameat2(&t.path("x"), &t.path("y"), libc::RENAME_NOREPLACE),
            "NOREPLACE"
        ),
        libc::EEXIST
    );
    assert_eq!(fs::read(t.path("x")).expect("read"), b"x content");
    assert_eq!(fs::read(t.path("y")).expect("read"), b"y content");
    // ... and onto a free name it is a plain rename.
    renameat2(&t.path("x"), &t.path("x2"), libc::RENAME_NOREPLACE)
        .expect("NOREPLACE to a free name");
    assert_eq!(ino("x2"), ix);
    fs::rename(t.path("x2"), t.path("x")).expect("rename back");

    // RENAME_EXCHANGE of two files: names swap, inodes follow the content.
    renameat2(&t.path("x"), &t.path("y"), libc::RENAME_EXCHANGE).expect("exchange files");
    assert_eq!(fs::read(t.path("x")).expect("read"), b"y content");
    assert_eq!(fs::read(t.path("y")).expect("read"), b"x content");
    assert_eq!((ino("x"), ino("y")), (iy, ix));

    // A file and a directory in different parents: the directory's `..` follows.
    renameat2(&t.path("d1/sub"), &t.path("d2/z"), libc::RENAME_EXCHANGE)
        .expect("exchange file and dir");
    assert!(t.path("d2/z").is_dir());
    assert_eq!(ino("d2/z"), isub);
    assert_eq!(fs::read(t.path("d1/sub")).expect("read"), b"z content");
    assert_eq!(ino("d2/z/.."), ino("d2"), "`..` of the moved directory");
    assert_eq!(
        fs::metadata(t.path("d1")).expect("stat").nlink(),
        2,
        "d1 lost its subdirectory"
    );
    assert_eq!(
        fs::metadata(t.path("d2")).expect("stat").nlink(),
        3,
        "d2 gained a subdirectory"
    );

    // EXCHANGE needs both names; and cannot put a directory inside itself.
    assert_eq!(
        errno_of(
            renameat2(&t.path("x"), &t.path("nope"), libc::RENAME_EXCHANGE),
            "EXCHANGE missing"
        ),
        libc::ENOENT
    );
    fs::create_dir(t.path("d2/z/inner")).expect("mkdir");
    assert_eq!(
        errno_of(
            renameat2(&t.path("d2"), &t.path("d2/z/inner"), libc::RENAME_EXCHANGE),
            "EXCHANGE into subtree"
        ),
        libc::EINVAL
    );
    assert_eq!(
        errno_of(
            renameat2(
                &t.path("x"),
                &t.path("y"),
                libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE
            ),
            "EXCHANGE|NOREPLACE"
        ),
        libc::EINVAL
    );
    m.assert_healthy();
    m.umount();

    // The swaps are persistent.
    let m = t.mount();
    assert_eq!(fs::read(t.path("x")).expect("read"), b"y content");
    assert_eq!(fs::read(t.path("d1/sub")).expect("read"), b"z content");
    assert_eq!(ino("d2/z"), isub);
    assert_eq!(ino("d2/z/.."), ino("d2"));
    m.umount();
}

#[test]
fn seek_data_hole_and_punch_hole() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let mut rng = Rng::new(0x5EEC);
    let size = 8 * CHUNK;
    let f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(t.path("sparse"))
        .expect("create");
    let mut expected = vec![0u8; size as usize];
    for (off, len) in [(0u64, 100usize), (4 * CHUNK + 10, CHUNK as usize)] {
        let d = rng.bytes(len);
        f.write_all_at(&d, off).expect("pwrite");
        expected[off as usize..off as usize + len].copy_from_slice(&d);
    }
    f.set_len(size).expect("set_len");
    // Data in chunk 0 and chunks 4..=5; holes elsewhere (chunk granularity).
    let seek = |off: u64, whence| lseek(&f, off as i64, whence);
    assert_eq!(seek(0, libc::SEEK_DATA).expect("data@0"), 0);
    assert_eq!(seek(50, libc::SEEK_DATA).expect("data@50"), 50);
    assert_eq!(seek(0, libc::SEEK_HOLE).expect("hole@0"), CHUNK as i64);
    assert_eq!(
        seek(CHUNK, libc::SEEK_DATA).expect("data@chunk1"),
        (4 * CHUNK) as i64
    );
    assert_eq!(
        seek(4 * CHUNK, libc::SEEK_HOLE).expect("hole@chunk4"),
        (6 * CHUNK) as i64
    );
    assert_eq!(
        seek(2 * CHUNK + 5, libc::SEEK_HOLE).expect("hole in hole"),
        (2 * CHUNK + 5) as i64
    );
    assert_eq!(
        errno_of(seek(6 * CHUNK, libc::SEEK_DATA), "no data after"),
        libc::ENXIO
    );
    assert_eq!(
        errno_of(seek(size, libc::SEEK_DATA), "DATA at EOF"),
        libc::ENXIO
    );
    assert_eq!(
        errno_of(seek(size, libc::SEEK_HOLE), "HOLE at EOF"),
        libc::ENXIO
    );
    assert_eq!(
        seek(size - 1, libc::SEEK_HOLE).expect("hole before EOF"),
        (size - 1) as i64
    );

    // PUNCH_HOLE inside a chunk, across a chunk boundary, and a whole chunk.
    let keep = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    for (off, len) in [(10u64, 20u64), (5 * CHUNK - 100, 200), (4 * CHUNK, CHUNK)] {
        fallocate(&f, keep, off as i64, len as i64).expect("punch hole");
        expected[off as usize..(off + len) as usize].fill(0);
    }
    // Punching past EOF keeps the size.
    fallocate(&f, keep, (size - 10) as i64, 1000).expect("punch past EOF");
    assert_eq!(f.metadata().expect("fstat").len(), size);
    let mut got = vec![0u8; size as usize];
    f.read_exact_at(&mut got, 0).expect("read");
    assert_bytes_eq(&got, &expected, "after punching holes");
    assert_eq!(
        seek(CHUNK, libc::SEEK_DATA).expect("data after the punched chunk"),
        (5 * CHUNK) as i64,
        "the punched chunk 4 is a hole now"
    );

    // Modes spoolfs does not do, and PUNCH_HOLE without KEEP_SIZE.
    assert_eq!(
        errno_of(
            fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 10),
            "PUNCH without KEEP_SIZE"
        ),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        errno_of(
            fallocate(&f, libc::FALLOC_FL_COLLAPSE_RANGE, 0, CHUNK as i64),
            "COLLAPSE_RANGE"
        ),
        libc::EOPNOTSUPP
    );
    // Plain fallocate grows the size; the new range reads as zeros.
    fallocate(&f, 0, size as i64, 1000).expect("fallocate grows");
    assert_eq!(f.metadata().expect("fstat").len(), size + 1000);
    expected.resize(size as usize + 1000, 0);
    close_checked(f).expect("close");
    m.assert_healthy();
    m.umount();

    let m = t.mount();
    assert_bytes_eq(
        &read_all(&t.path("sparse")).expect("read"),
        &expected,
        "after restart",
    );
    let f = File::open(t.path("sparse")).expect("open");
    assert_eq!(
        lseek(&f, CHUNK as i64, libc::SEEK_DATA).expect("SEEK_DATA"),
        (5 * CHUNK) as i64
    );
    drop(f);
    m.umount();
}

/// A sanity check that a write never shows stale bytes after a hole is punched and then
/// refilled through the page cache of another descriptor.
#[test]
fn punch_then_write_through_two_descriptors() {
    let Some(t) = TestFs::new() else { return };
    let m = t.mount();
    let p = t.path("f");
    let mut a = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&p)
        .expect("create");
    a.write_all(&vec![1u8; 3 * CHUNK as usize]).expect("write");
    let b = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .expect("open again");
    fallocate(
        &b,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        CHUNK as i64,
        CHUNK as i64,
    )
    .expect("punch");
    b.write_all_at(&[2u8; 10], CHUNK + 5)
        .expect("write into the hole");
    let mut got = vec![0u8; 3 * CHUNK as usize];
    a.read_exact_at(&mut got, 0).expect("read");
    let mut want = vec![1u8; 3 * CHUNK as usize];
    want[CHUNK as usize..2 * CHUNK as usize].fill(0);
    want[CHUNK as usize + 5..CHUNK as usize + 15].fill(2);
    assert_bytes_eq(
        &got,
        &want,
        "punch + write seen through the other descriptor",
    );
    drop(a);
    drop(b);
    m.assert_healthy();
    m.umount();
}
