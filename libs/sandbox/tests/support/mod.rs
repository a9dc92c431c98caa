//! What the backends' tests share.
#![allow(dead_code)]

/// A version's archive of the files in `files` (path, content; `@target`
/// makes a link), and the directory it was made from.
pub fn tree_archive(
    dir: &std::path::Path,
    name: &str,
    files: &[(&str, &str)],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = dir.join(name);
    for (path, content) in files {
        let full = src.join(path);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        match content.strip_prefix('@') {
            Some(target) => std::os::unix::fs::symlink(target, &full).expect("link"),
            None => std::fs::write(&full, content).expect("write"),
        }
    }
    let archive = dir.join(format!("{name}.tar.gz"));
    let out = std::fs::File::create(&archive).expect("archive");
    vm0_storage::pack_dir(&src, out, &vm0_storage::Limits::default()).expect("pack");
    (archive, src)
}
