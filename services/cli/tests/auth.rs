//! `vm0 auth` as a user runs it: the real binary against a real gateway.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use vm0_gateway::{Gateway, GatewayConfig};

/// A gateway on a free port with one organization and a token of it.
async fn gateway(dir: &std::path::Path) -> (String, String, tokio_util::sync::CancellationToken) {
    let url = format!("sqlite://{}?mode=rwc", dir.join("vm0.db").display());
    let config = GatewayConfig::for_database(url);
    let secrets = vm0_gateway::secrets::SecretBox::new([7; 32]);
    let gateway = Gateway::open(config, secrets).await.expect("gateway");
    let org = gateway
        .store
        .ensure_organization("cli-test", vm0_api_types::Timestamp::now().micros())
        .await
        .expect("org");
    let token =
        vm0_gateway::routes::tokens::create_token(&gateway.store, &org.id, "cli", None, None)
            .await
            .expect("token")
            .token;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", http.local_addr().expect("addr"));
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(gateway.serve(http, None, shutdown.clone()));
    (base, token, shutdown)
}

/// `vm0 args...` with `config_home` as its config dir and `stdin` on stdin.
fn vm0(config_home: &std::path::Path, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vm0"))
        .args(args)
        .env("XDG_CONFIG_HOME", config_home)
        .env_remove("VM0_API_URL")
        .env_remove("VM0_API_KEY")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vm0");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("vm0 ran")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_stores_a_checked_token_that_setup_token_prints() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("dir");
    let (url, token, _stop) = gateway(dir.path()).await;
    let home = dir.path().join("config");
    let file = home.join("vm0/config.toml");

    // A wrong token: refused by the API, with its message, code and request id;
    // nothing stored.
    let bad = "vm0_live_".to_owned() + &"0".repeat(64);
    let out = vm0(
        &home,
        &["auth", "login", "--url", &url],
        &format!("{bad}\n"),
        &[],
    );
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("not accepted"), "{err}");
    assert!(err.contains("HTTP 401"), "{err}");
    assert!(err.contains("code "), "the API's code is shown: {err}");
    assert!(
        err.contains("request id ") && !err.contains("request id none"),
        "the request id is shown: {err}"
    );
    assert!(!file.exists());

    // The right one, on stdin.
    let out = vm0(
        &home,
        &["auth", "login", "--url", &url],
        &format!("{token}\n"),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mode = std::fs::metadata(&file)
        .expect("stored")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "readable by its owner only");
    let stored = std::fs::read_to_string(&file).expect("read");
    assert!(stored.contains(&token) && stored.contains(&url), "{stored}");
    assert!(
        !text(&out.stdout).contains(&token),
        "login does not echo the token"
    );

    let out = vm0(&home, &["auth", "setup-token"], "", &[]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), format!("{token}\n"));
    // The environment wins over the file.
    let out = vm0(
        &home,
        &["auth", "setup-token"],
        "",
        &[("VM0_API_KEY", "vm0_live_env")],
    );
    assert_eq!(text(&out.stdout), "vm0_live_env\n");

    let out = vm0(&home, &["auth", "logout"], "", &[]);
    assert!(out.status.success());
    assert!(!file.exists());
    let out = vm0(&home, &["auth", "setup-token"], "", &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("vm0 auth login"),
        "{}",
        text(&out.stderr)
    );
}
