//! Version archives: a directory packed and unpacked comes back the same, and a
//! hostile archive writes nothing outside its directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use vm0_storage::{ArchiveError, Limits, ManifestError, pack_dir, unpack};

fn write(path: &Path, content: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dirs");
    std::fs::write(path, content).expect("write");
}

#[test]
fn a_directory_comes_back_the_same() {
    let tmp = tempfile::tempdir().expect("dir");
    let src = tmp.path().join("work");
    write(&src.join("a.txt"), b"hello\n");
    write(&src.join("empty"), b"");
    write(&src.join("deep/er/still/x.bin"), &[0u8, 1, 2, 255]);
    write(&src.join("bin/run.sh"), b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(
        src.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    // A link out of the directory is kept as a link, never followed.
    std::os::unix::fs::symlink("../../../etc/passwd", src.join("deep/escape")).expect("link");
    std::os::unix::fs::symlink("a.txt", src.join("alias")).expect("link");
    // Special files are skipped, with a line.
    nix_mkfifo(&src.join("pipe"));

    let mut tgz = Vec::new();
    let packed = pack_dir(&src, &mut tgz, &Limits::default()).expect("pack");
    let paths: Vec<&str> = packed
        .manifest
        .files()
        .iter()
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(
        paths,
        [
            "a.txt",
            "alias",
            "bin/run.sh",
            "deep/er/still/x.bin",
            "deep/escape",
            "empty"
        ]
    );
    assert_eq!(packed.skipped.len(), 1, "{:?}", packed.skipped);
    assert!(
        packed.skipped[0].starts_with("pipe: "),
        "{:?}",
        packed.skipped
    );
    let escape = &packed.manifest.files()[4];
    assert_eq!(escape.link.as_deref(), Some("../../../etc/passwd"));

    let out = tmp.path().join("out");
    let unpacked = unpack(tgz.as_slice(), &out, &Limits::default()).expect("unpack");
    assert_eq!(unpacked.version_id(), packed.manifest.version_id());
    assert_eq!(std::fs::read(out.join("a.txt")).expect("read"), b"hello\n");
    assert_eq!(
        std::fs::read(out.join("deep/er/still/x.bin")).expect("read"),
        [0, 1, 2, 255]
    );
    let mode = std::fs::metadata(out.join("bin/run.sh"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "the executable bit is kept");
    assert_eq!(
        std::fs::read_link(out.join("deep/escape")).expect("link"),
        Path::new("../../../etc/passwd")
    );

    // Never over what is there.
    assert!(matches!(
        unpack(tgz.as_slice(), &out, &Limits::default()),
        Err(ArchiveError::Refused { .. })
    ));

    // The same content packed again is the same version.
    let mut again = Vec::new();
    let repacked = pack_dir(&out, &mut again, &Limits::default()).expect("pack");
    assert_eq!(repacked.manifest.version_id(), packed.manifest.version_id());
}

fn nix_mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(made.success());
}

/// A tar entry with a raw name (the tar crate refuses to write bad ones).
fn raw_entry(
    tar: &mut tar::Builder<impl std::io::Write>,
    name: &[u8],
    kind: tar::EntryType,
    link: Option<&[u8]>,
    data: &[u8],
) {
    let mut h = tar::Header::new_gnu();
    {
        let gnu = h.as_gnu_mut().expect("gnu");
        gnu.name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            gnu.linkname[..l.len()].copy_from_slice(l);
        }
    }
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append(&h, data).expect("append");
}

fn archive(build: impl FnOnce(&mut tar::Builder<&mut Vec<u8>>)) -> Vec<u8> {
    let mut raw = Vec::new();
    {
        let mut tar = tar::Builder::new(&mut raw);
        build(&mut tar);
        tar.finish().expect("finish");
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &raw).expect("gzip");
    gz.finish().expect("gzip")
}

#[test]
fn hostile_archives_are_refused_and_write_nothing_outside() {
    use tar::EntryType::{Block, Char, Directory, Fifo, Link, Regular, Symlink};
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "parent",
            archive(|t| raw_entry(t, b"../outside", Regular, None, b"x")),
        ),
        (
            "deep parent",
            archive(|t| raw_entry(t, b"a/../../outside", Regular, None, b"x")),
        ),
        (
            "absolute",
            archive(|t| raw_entry(t, b"/tmp/outside", Regular, None, b"x")),
        ),
        (
            "control character",
            archive(|t| raw_entry(t, b"a\nb", Regular, None, b"x")),
        ),
        (
            "through a link",
            archive(|t| {
                raw_entry(t, b"out", Symlink, Some(b".."), b"");
                raw_entry(t, b"out/outside", Regular, None, b"x");
            }),
        ),
        (
            "link then directory",
            archive(|t| {
                raw_entry(t, b"d", Symlink, Some(b"/"), b"");
                raw_entry(t, b"d/tmp", Directory, None, b"");
            }),
        ),
        (
            "duplicate",
            archive(|t| {
                raw_entry(t, b"a", Regular, None, b"1");
                raw_entry(t, b"a", Regular, None, b"2");
            }),
        ),
        (
            "file then directory",
            archive(|t| {
                raw_entry(t, b"a", Regular, None, b"1");
                raw_entry(t, b"a/b", Regular, None, b"2");
            }),
        ),
        (
            "hard link",
            archive(|t| raw_entry(t, b"h", Link, Some(b"/etc/passwd"), b"")),
        ),
        ("device", archive(|t| raw_entry(t, b"dev", Char, None, b""))),
        ("block", archive(|t| raw_entry(t, b"blk", Block, None, b""))),
        ("fifo", archive(|t| raw_entry(t, b"f", Fifo, None, b""))),
        ("not gzip", b"plain text, no archive".to_vec()),
    ];
    for (what, tgz) in cases {
        let tmp = tempfile::tempdir().expect("dir");
        let dest = tmp.path().join("a/b/dest");
        let result = unpack(tgz.as_slice(), &dest, &Limits::default());
        assert!(result.is_err(), "{what}: taken");
        let err = result.unwrap_err();
        assert!(
            matches!(err, ArchiveError::Refused { .. } | ArchiveError::Corrupt(_)),
            "{what}: {err}"
        );
        eprintln!("{what}: {err}");
        // Nothing outside `dest`: its parents hold only it.
        let beside: Vec<_> = std::fs::read_dir(tmp.path().join("a/b"))
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(beside, ["dest"], "{what}: {err}");
        assert!(!Path::new("/tmp/outside").exists(), "{what}");
    }
}

#[test]
fn an_archive_that_expands_past_the_limits_is_stopped() {
    // 4 MiB of zeros compress to a few KiB: the sizes that count are those read.
    let bomb = archive(|t| {
        raw_entry(
            t,
            b"zeros",
            tar::EntryType::Regular,
            None,
            &vec![0u8; 4 << 20],
        )
    });
    assert!(bomb.len() < 64 << 10, "{} bytes compressed", bomb.len());
    let tmp = tempfile::tempdir().expect("dir");
    let limits = Limits {
        max_file_bytes: 1 << 20,
        max_total_bytes: 2 << 20,
        max_files: 10,
        ..Limits::default()
    };
    let err = unpack(bomb.as_slice(), &tmp.path().join("d"), &limits).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::Manifest(ManifestError::FileTooLarge { max, .. }) if *max == 1 << 20),
        "{err}"
    );
    let written = std::fs::metadata(tmp.path().join("d/zeros"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(written <= (1 << 20) + 1, "{written} bytes written");

    // Many files past the count.
    let many = archive(|t| {
        for i in 0..11 {
            raw_entry(
                t,
                format!("f{i}").as_bytes(),
                tar::EntryType::Regular,
                None,
                b"x",
            );
        }
    });
    let err = unpack(many.as_slice(), &tmp.path().join("e"), &limits).unwrap_err();
    assert!(
        matches!(
            err,
            ArchiveError::Manifest(ManifestError::TooManyFiles { max: 10, .. })
        ),
        "{err}"
    );

    // Packing refuses past the limits too.
    let src = tmp.path().join("src");
    write(&src.join("big"), &vec![1u8; (1 << 20) + 1]);
    let err = pack_dir(&src, std::io::sink(), &limits).unwrap_err();
    assert!(
        matches!(
            err,
            ArchiveError::Manifest(ManifestError::FileTooLarge { .. })
        ),
        "{err}"
    );
}
