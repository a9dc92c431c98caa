//! A real S3-compatible server for tests: moto in server mode (PyPI's
//! `moto[server]`, which `scripts/test.sh` installs), on a loopback port,
//! killed on drop. Never a mock of `object_store`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A moto S3 server with one bucket.
pub struct Moto {
    child: Child,
    pub endpoint: String,
    pub bucket: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Moto {
    /// Starts moto and creates `bucket`; panics, saying how to get moto,
    /// when it cannot.
    pub fn start(bucket: &str) -> Moto {
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server (scripts/test.sh installs moto[server] from PyPI)");
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: bucket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Creating the bucket is also the readiness check.
            let made = Command::new("curl")
                .args(["-sf", "-X", "PUT", &format!("{}/{bucket}", moto.endpoint)])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if made {
                return moto;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not start in 30 s (is moto[server] installed? scripts/test.sh installs it)"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `object_store` settings that reach this server.
    pub fn s3_config(&self) -> Vec<(String, String)> {
        [
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_region", "us-east-1"),
            ("aws_access_key_id", "testing"),
            ("aws_secret_access_key", "testing"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}
