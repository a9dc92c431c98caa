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

/// What a sandbox reported: its output (both streams), log lines, the trees
/// it gave back, and how it ended.
pub struct Reported {
    pub output: String,
    pub logs: Vec<String>,
    pub saved: Vec<(String, Result<vm0_sandbox::TreeTaken, String>)>,
    pub exit: vm0_sandbox::ExitReport,
}

/// Reads a sandbox's events until `Exited`.
pub async fn collect(mut sb: vm0_sandbox::RunningSandbox) -> Reported {
    use vm0_sandbox::SandboxEvent;
    let (mut output, mut logs, mut saved) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        match sb.next_event().await.expect("events end with Exited") {
            SandboxEvent::Stdout(b) | SandboxEvent::Stderr(b) => output.extend_from_slice(&b),
            SandboxEvent::TreeSaved { src, result } => saved.push((src, result)),
            SandboxEvent::Log(l) => logs.push(l),
            SandboxEvent::Exited(exit) => {
                return Reported {
                    output: String::from_utf8_lossy(&output).into_owned(),
                    logs,
                    saved,
                    exit,
                };
            }
            _ => {}
        }
    }
}
