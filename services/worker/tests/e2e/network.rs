//! Egress, from the agent's side: runs reach a "remote" host (HTTP, TLS, plain
//! TCP servers in a network namespace of their own, behind a veth, reached
//! through `extraHosts` and `VM0_NETWORK_TRUSTED_CIDRS`) as their policy says,
//! never the metadata address, the worker's own addresses, NATS or the control
//! plane, and every attempt is a `network` log.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use vm0_db::testing::TestDb as Db;

use crate::harness::{Stack, StackOptions};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

const SERVERS: &str = r#"
import http.server, socketserver, ssl, sys, threading
addr, cert, key = sys.argv[1], sys.argv[2], sys.argv[3]
class Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/key":
            # What the host was sent, by digest: the run's output masks the value.
            import hashlib
            keys = self.headers.get_all("X-Api-Key") or []
            said = ",".join(hashlib.sha256(k.encode()).hexdigest() for k in keys) or "none"
            body = f"key-sha256={said} at={addr}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        body = b"x" * (1 << 20) if self.path == "/big" else b"hello from remote\n"
        self.send_response(200 if self.path != "/missing" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.readline())
http.server.ThreadingHTTPServer.allow_reuse_address = True
plain = http.server.ThreadingHTTPServer((addr, 80), Page)
tls = http.server.ThreadingHTTPServer((addr, 443), Page)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
socketserver.ThreadingTCPServer.allow_reuse_address = True
echo = socketserver.ThreadingTCPServer((addr, 7000), Echo)
for s in (plain, tls, echo):
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"#;

/// A host on a network of its own: `10.<a>.<b>.2`, its neighbour (this
/// machine) `.1`, with HTTP on 80, HTTPS on 443 (`ca_pem` signed its
/// certificate for the test's names) and a line echo on 7000.
struct RemoteHost {
    ns: String,
    ip: String,
    /// This machine's end of the link: one of the worker's own addresses.
    local_ip: String,
    /// The /30 to trust.
    subnet: String,
    ca_pem: String,
    server: Child,
}

impl RemoteHost {
    fn start(dir: &std::path::Path) -> RemoteHost {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let (a, b) = (100 + pid % 150, (pid / 150 % 60) * 4 + n % 4);
        let ns = format!("vm0t-{pid}-{n}");
        let host_if = format!("vm0t{}x{n}", pid % 100_000);
        let (subnet, local_ip, remote_ip) = (
            format!("10.{a}.{b}.0/30"),
            format!("10.{a}.{b}.1"),
            format!("10.{a}.{b}.2"),
        );
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["addr", "add", &format!("{local_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{remote_ip}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        let ca = vm0_tls::Authority::new("vm0 test remote").expect("ca");
        let cert = ca.server(&["secure.test".to_owned()]).expect("server cert");
        let (cert_file, key_file) = (dir.join(format!("{ns}.crt")), dir.join(format!("{ns}.key")));
        std::fs::write(&cert_file, &cert.cert_pem).expect("cert");
        std::fs::write(&key_file, &cert.key_pem).expect("key");
        let mut server = Command::new("ip")
            .args(["netns", "exec", &ns, "python3", "-c", SERVERS, &remote_ip])
            .arg(&cert_file)
            .arg(&key_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("servers");
        let mut ready = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(server.stdout.take().expect("stdout"))
            .read_line(&mut ready)
            .expect("ready");
        assert_eq!(ready.trim(), "ready", "the remote's servers did not start");
        RemoteHost {
            ns,
            ip: remote_ip,
            local_ip,
            subnet,
            ca_pem: ca.cert_pem(),
            server,
        }
    }
}

impl Drop for RemoteHost {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        // The veth pair goes with its namespace.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.ns])
            .status();
    }
}

async fn stack_for(remote: &RemoteHost, db: Db) -> Stack {
    stack_on(remote, db, "bubblewrap").await
}

async fn stack_on(remote: &RemoteHost, db: Db, sandbox: &'static str) -> Stack {
    stack_as(remote, db, sandbox, None).await
}

/// A stack whose workers trust `remote`'s range, run `sandbox`, as
/// `worker_uid` when given (an unprivileged worker).
async fn stack_as(
    remote: &RemoteHost,
    db: Db,
    sandbox: &'static str,
    worker_uid: Option<u32>,
) -> Stack {
    Stack::start(
        db,
        StackOptions {
            sandbox,
            worker_uid,
            worker_env: vec![("VM0_NETWORK_TRUSTED_CIDRS", remote.subnet.clone())],
            ..Default::default()
        },
    )
    .await
}

fn port_of(url: &str) -> String {
    url.rsplit(':')
        .next()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_owned()
}

/// The agent's side: one line per attempt, `name:result`.
fn script(remote: &RemoteHost, nats_port: &str, grpc_port: &str) -> String {
    format!(
        r#"printf '%s' "$CA_PEM" > /tmp/ca.pem
try() {{ name=$1; shift; code=$(curl -s -o /dev/null -m 10 -w '%{{http_code}}' "$@"); echo "$name:$? $code"; }}
try allowed http://allowed.test/hello
try big http://allowed.test/big
try missing http://allowed.test/missing
try secure --cacert /tmp/ca.pem https://secure.test/hello
try offlist http://denied.test/
try bare http://{remote}/hello
try metadata http://169.254.169.254/latest/meta-data/
try nats http://{local}:{nats_port}/
try grpc http://{local}:{grpc_port}/
try loopback http://127.0.0.1:{nats_port}/
( exec 3<>/dev/tcp/{remote}/7000 && echo ping >&3 && read -r line <&3 && echo "echo:$line" ) || echo "echo:refused"
sleep 0.6
"#,
        remote = remote.ip,
        local = remote.local_ip,
    )
}

fn line<'a>(output: &'a str, name: &str) -> &'a str {
    output
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name}: line in {output}"))
}

/// Whether curl's attempt was cut without a reply: the proxy closes a refused
/// connection without reading it, so whether the request got there first
/// decides between a close (curl's 52, an empty reply) and a reset (56, or 55
/// while sending); a guest under TCG sends late, a bwrap jail at once.
fn cut_without_reply(attempt: &str) -> bool {
    ["52 000", "55 000", "56 000"].contains(&attempt)
}

fn network_logs(logs: &[Value]) -> Vec<&Value> {
    logs.iter().filter(|l| l["type"] == "network").collect()
}

fn find<'a>(logs: &[&'a Value], host: &str, port: u64) -> &'a Value {
    logs.iter()
        .find(|l| l["metadata"]["host"] == host && l["metadata"]["port"] == port)
        .copied()
        .unwrap_or_else(|| panic!("no network log for {host}:{port} in {logs:#?}"))
}

/// Where [`run_script`] runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum On {
    Bubblewrap,
    /// A microVM, in the client image, with one more attempt: the proxy's own
    /// address on the guest's link.
    MicroVm,
}

/// What a run of [`script`] printed, and its logs.
async fn run_script(
    stack: &Stack,
    remote: &RemoteHost,
    name: &str,
    network: Value,
    on: On,
) -> (Value, String, Vec<Value>) {
    let nats_port = port_of(&stack.nats.options(vm0_bus::Role::Worker).url);
    let grpc_port = port_of(&stack.gateways[0].grpc);
    let mut command = script(remote, &nats_port, &grpc_port);
    let mut config = json!({"env": {"CA_PEM": remote.ca_pem}, "network": network});
    let mut attempts = 10;
    if on == On::MicroVm {
        command.push_str(&format!(
            "try proxy http://{}:15001/\n",
            vm0_egress::netns::TAP_GATEWAY
        ));
        config["image"] = client_image().into();
        config["resources"] = json!({"memoryMb": 256});
        attempts += 1;
    }
    config["command"] = json!(["bash", "-c", command]);
    stack.create_agent(name, config).await;
    let id = stack
        .create_run(0, json!({"agent": name, "prompt": "go"}))
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(180)).await;
    let output = stack.output(&id).await;
    // Logs are stored by the persister, shortly after: until the run's
    // attempts are there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut logs = stack.logs(&id).await;
    while network_logs(&logs).len() < attempts && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        logs = stack.logs(&id).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = stack.logs(&id).await;
    (run, output, logs)
}

fn extra_hosts(remote: &RemoteHost) -> Value {
    json!({"allowed.test": remote.ip, "secure.test": remote.ip, "denied.test": remote.ip})
}

/// allowlist: the names on the list answer, by HTTP `Host`, TLS SNI and by
/// address; a name off it does not resolve; the always-refused do not answer
/// even when allowed; every attempt is logged with its action; the metrics
/// count what moved.
async fn allowlist(db: Db) {
    let dir = tempfile::tempdir().expect("dir");
    let remote = RemoteHost::start(dir.path());
    let stack = stack_for(&remote, db).await;
    allowlisted_run(&stack, &remote, On::Bubblewrap).await;
}

/// The run of [`script`] under [`allowlisted`], checked by
/// [`assert_allowlisted`]: what it printed, and its logs.
async fn allowlisted_run(stack: &Stack, remote: &RemoteHost, on: On) -> (String, Vec<Value>) {
    let (run, out, logs) = run_script(stack, remote, "allowlisted", allowlisted(remote), on).await;
    assert_allowlisted(stack, remote, &run, &out, &logs).await;
    (out, logs)
}

/// The policy of the allowlist tests.
fn allowlisted(remote: &RemoteHost) -> Value {
    let allow = json!([
        "allowed.test",
        "secure.test:443",
        format!("{}:7000", remote.ip),
        format!("{}", remote.local_ip),
        "169.254.0.0/16"
    ]);
    json!({"mode": "allowlist", "allow": allow, "extraHosts": extra_hosts(remote)})
}

/// What a run of [`script`] under [`allowlisted`] must have seen and logged.
async fn assert_allowlisted(
    stack: &Stack,
    remote: &RemoteHost,
    run: &Value,
    out: &str,
    logs: &[Value],
) {
    assert_eq!(run["status"], "completed", "{run}\n{out}");
    assert_eq!(line(out, "allowed"), "0 200", "{out}");
    assert_eq!(line(out, "big"), "0 200", "{out}");
    assert_eq!(line(out, "missing"), "0 404", "{out}");
    assert_eq!(line(out, "secure"), "0 200", "{out}");
    // Off the list: the name does not resolve (curl's 6).
    assert!(line(out, "offlist").starts_with("6 "), "{out}");
    // An address with no rule for port 80: the proxy answers 403.
    assert_eq!(line(out, "bare"), "0 403", "{out}");
    // Allowed by a rule, refused always.
    assert_eq!(line(out, "metadata"), "0 403", "{out}");
    // The worker's own addresses: NATS and the control plane are not
    // reached (NATS would greet curl first, curl's 1), the proxy cuts them.
    assert!(cut_without_reply(line(out, "nats")), "{out}");
    assert!(cut_without_reply(line(out, "grpc")), "{out}");
    // The sandbox's loopback is its own: nothing listens there.
    assert!(line(out, "loopback").starts_with("7 "), "{out}");
    assert_eq!(line(out, "echo"), "ping", "{out}");

    let net = network_logs(logs);
    let hello = find(&net, "allowed.test", 80);
    assert_eq!(hello["metadata"]["mode"], "http");
    assert_eq!(hello["metadata"]["action"], "allow");
    assert_eq!(hello["metadata"]["rule"], "allow allowed.test");
    assert_eq!(hello["level"], "info");
    assert!(
        net.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("GET http://allowed.test/hello - 200 ("))),
        "{net:#?}"
    );
    let missing = net
        .iter()
        .find(|l| l["metadata"]["url"] == "http://allowed.test/missing")
        .expect("the 404");
    assert_eq!(missing["level"], "error");
    assert_eq!(missing["metadata"]["status"], 404);
    let secure = find(&net, "secure.test", 443);
    assert_eq!(secure["metadata"]["mode"], "sni");
    assert_eq!(secure["metadata"]["action"], "allow");
    assert!(
        secure["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("CONNECT secure.test:443 - allowed (sni)"))
    );
    let echo = find(&net, &remote.ip, 7000);
    assert_eq!(echo["metadata"]["mode"], "tcp");
    assert_eq!(echo["metadata"]["action"], "allow");
    assert!(echo["metadata"]["bytesIn"].as_u64() >= Some(5));
    let denied = find(&net, "denied.test", 53);
    assert_eq!(denied["metadata"]["action"], "deny");
    assert_eq!(denied["level"], "error");
    let bare = net
        .iter()
        .find(|l| l["metadata"]["host"] == remote.ip.as_str() && l["metadata"]["port"] == 80)
        .expect("the bare address");
    assert_eq!(bare["metadata"]["rule"], "not in allow");
    let metadata = find(&net, "169.254.169.254", 80);
    assert_eq!(metadata["metadata"]["action"], "deny");
    assert!(
        metadata["metadata"]["rule"]
            .as_str()
            .is_some_and(|r| r.contains("link-local")),
        "{metadata}"
    );
    let nats_port: u64 = port_of(&stack.nats.options(vm0_bus::Role::Worker).url)
        .parse()
        .expect("port");
    let nats = find(&net, &remote.local_ip, nats_port);
    assert_eq!(nats["metadata"]["action"], "deny");
    assert!(
        nats["metadata"]["rule"]
            .as_str()
            .is_some_and(|r| r.contains("always refused")),
        "{nats}"
    );

    // The 1 MiB page is in the run's received bytes.
    let metrics = stack
        .get(&format!(
            "/v1/runs/{}/metrics",
            run["id"].as_str().expect("id")
        ))
        .await;
    let rx = metrics["data"]
        .as_array()
        .expect("metrics")
        .iter()
        .filter_map(|m| m["networkRxBytes"].as_i64())
        .max()
        .unwrap_or(0);
    assert!(rx > 1 << 20, "network rx {rx}: {metrics}");
}

vm0_db::on_both_databases!(allowlist);

/// `none`: nothing answers, and every attempt says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_none_reaches_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let remote = RemoteHost::start(dir.path());
    let stack = stack_for(&remote, Db::Sqlite).await;
    let (run, out, logs) = run_script(
        &stack,
        &remote,
        "offline",
        json!({"mode": "none", "extraHosts": extra_hosts(&remote)}),
        On::Bubblewrap,
    )
    .await;
    assert_offline(&remote, &run, &out, &logs);
}

/// What a run of [`script`] under `mode: none` must have seen and logged.
fn assert_offline(remote: &RemoteHost, run: &Value, out: &str, logs: &[Value]) {
    assert_eq!(run["status"], "completed", "{run}\n{out}");
    for name in ["allowed", "big", "secure", "offlist"] {
        assert!(line(out, name).starts_with("6 "), "{name}: {out}");
    }
    assert_eq!(line(out, "bare"), "0 403", "{out}");
    assert_eq!(line(out, "echo"), "refused", "{out}");
    let net = network_logs(logs);
    assert!(net.len() >= 6, "{net:#?}");
    assert!(
        net.iter().all(|l| l["metadata"]["action"] == "deny"),
        "{net:#?}"
    );
    assert_eq!(
        find(&net, &remote.ip, 7000)["metadata"]["rule"],
        "mode none"
    );
}

/// `open`: what is not denied answers; the always-refused stay refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_still_refuses_the_worker_and_the_metadata_address() {
    let dir = tempfile::tempdir().expect("dir");
    let remote = RemoteHost::start(dir.path());
    let stack = stack_for(&remote, Db::Sqlite).await;
    let (run, out, logs) = run_script(
        &stack,
        &remote,
        "open",
        json!({"mode": "open", "deny": ["denied.test"], "extraHosts": extra_hosts(&remote)}),
        On::Bubblewrap,
    )
    .await;
    assert_eq!(run["status"], "completed", "{run}\n{out}");
    assert_eq!(line(&out, "allowed"), "0 200", "{out}");
    assert_eq!(line(&out, "secure"), "0 200", "{out}");
    assert_eq!(line(&out, "bare"), "0 200", "{out}");
    assert!(line(&out, "offlist").starts_with("6 "), "{out}");
    assert_eq!(line(&out, "metadata"), "0 403", "{out}");
    assert_eq!(line(&out, "echo"), "ping", "{out}");
    let net = network_logs(&logs);
    assert_eq!(
        find(&net, "denied.test", 53)["metadata"]["rule"],
        "deny denied.test"
    );
    let grpc_port: u64 = port_of(&stack.gateways[0].grpc).parse().expect("port");
    assert_eq!(
        find(&net, &remote.local_ip, grpc_port)["metadata"]["action"],
        "deny"
    );
    the_run_cannot_rewrite_its_namespace(&stack, &remote).await;
}

/// A run that tries to undo its namespace's steering (drop the rules, take
/// down its loopback, give itself an address) is refused every time, and
/// still reaches what its policy allows, through the proxy.
async fn the_run_cannot_rewrite_its_namespace(stack: &Stack, remote: &RemoteHost) {
    let command = r#"try() { name=$1; shift; "$@" >/dev/null 2>&1; echo "$name:$?"; }
try flush nft flush ruleset
try down ip link set lo down
try addr ip addr add 10.77.0.1/24 dev lo
try dummy ip link add vm0x type dummy
code=$(curl -s -o /dev/null -m 10 -w '%{http_code}' http://allowed.test/hello); echo "after:$? $code"
"#;
    stack
        .create_agent(
            "rewriter",
            json!({
                "command": ["bash", "-c", command],
                "network": {"mode": "allowlist", "allow": ["allowed.test"], "extraHosts": extra_hosts(remote)},
            }),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "rewriter", "prompt": "go"}))
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(60)).await;
    let out = stack.output(&id).await;
    assert_eq!(run["status"], "completed", "{run}\n{out}");
    for name in ["flush", "down", "addr", "dummy"] {
        assert_ne!(line(&out, name), "0", "{name} succeeded: {out}");
    }
    assert_eq!(line(&out, "after"), "0 200", "{out}");
}

/// An unprivileged worker (`vm0 dev` started by a normal user) gives its runs
/// the same network, in a namespace owned by a user namespace of its own: the
/// allowlist run sees and logs the same; the run cannot rewrite it; nothing is
/// held once it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_worker_gives_runs_the_same_network() {
    let dir = tempfile::tempdir().expect("dir");
    let remote = RemoteHost::start(dir.path());
    let stack = stack_as(&remote, Db::Sqlite, "bubblewrap", Some(65534)).await;
    let (_, logs) = allowlisted_run(&stack, &remote, On::Bubblewrap).await;
    let system: Vec<&str> = logs
        .iter()
        .filter(|l| l["type"] == "system")
        .filter_map(|l| l["message"].as_str())
        .collect();
    assert!(
        system
            .iter()
            .any(|m| m.starts_with("network: mode allowlist")),
        "{system:#?}"
    );
    the_run_cannot_rewrite_its_namespace(&stack, &remote).await;
    let after = released(stack.workers[0].pid(), (0, usize::MAX, 0)).await;
    assert_eq!(after.0, 0, "the worker still holds {} namespaces", after.0);
    assert_eq!(after.2, 0, "the worker has children left");
}

/// A run that floods the proxy with connections: past the rate of new ones
/// (`VM0_NETWORK_NEW_CONNECTIONS_PER_SEC`, here 200: a loop of blocking
/// connects in a sandbox makes fewer than 1000 a second on this machine) they
/// are reset, what the kernel tracks of its connections stays bounded and
/// expires within seconds (1 s closed, 10 s in a closing state; unbounded,
/// 20 000 connections were 20 000 entries for two minutes), and the run's log
/// says how many were refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_is_bounded_and_said() {
    let stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            worker_env: vec![("VM0_NETWORK_NEW_CONNECTIONS_PER_SEC", "200".into())],
            ..Default::default()
        },
    )
    .await;
    let flood = r#"
import socket, time
ok = refused = 0
for i in range(20000):
    s = socket.socket()
    try:
        s.connect(("203.0.113.%d" % (i % 250 + 1), 9))
        ok += 1
    except OSError:
        refused += 1
    s.close()
count = lambda: open("/proc/sys/net/netfilter/nf_conntrack_count").read().strip()
print(f"ok:{ok}")
print(f"refused:{refused}")
print(f"tracked:{count()}")
time.sleep(15)
print(f"later:{count()}")
"#;
    stack
        .create_agent(
            "flooder",
            json!({"command": ["python3", "-c", flood], "network": {"mode": "none"}}),
        )
        .await;
    let id = stack
        .create_run(0, json!({"agent": "flooder", "prompt": "go"}))
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(120)).await;
    let out = stack.output(&id).await;
    assert_eq!(run["status"], "completed", "{run}\n{out}");
    let number = |name: &str| -> u64 { line(&out, name).parse().expect(name) };
    assert!(number("refused") > 10_000, "{out}");
    assert!(number("ok") >= 400, "the burst gets through: {out}");
    assert!(number("tracked") < 10_000, "{out}");
    // Expired entries wait for the kernel's collection (adaptive, up to a
    // minute); unbounded, the count stays at ~20 000 for two minutes.
    assert!(number("later") < 2000, "{out}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let said = loop {
        let logs = stack.logs(&id).await;
        let said = logs.iter().find_map(|l| {
            l["message"]
                .as_str()
                .filter(|m| m.contains("connection attempts and DNS queries were refused"))
                .map(str::to_owned)
        });
        if said.is_some() || tokio::time::Instant::now() > deadline {
            break said;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let said = said.expect("the run's log says how many were refused");
    let n: u64 = said
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a count");
    assert!(n >= number("refused"), "{said} / {out}");
}

/// What the worker holds of namespaces (descriptors of `net:[...]`, of the
/// `user:[...]` that own an unprivileged worker's, and of tap devices, which
/// live in them), sockets, and its child processes.
fn held_by(pid: u32) -> (usize, usize, usize) {
    let mut netns = 0;
    let mut sockets = 0;
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            let target = target.to_string_lossy();
            netns += usize::from(
                target.starts_with("net:[")
                    || target.starts_with("user:[")
                    || target == "/dev/net/tun",
            );
            sockets += usize::from(target.starts_with("socket:["));
        }
    }
    let children = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().nth(1))
                .is_some_and(|ppid| ppid == pid.to_string())
        })
        .count();
    (netns, sockets, children)
}

/// What the worker holds once its last runs let go (their ends are reported
/// before their sockets are all closed): what [`held_by`] counts, after at
/// most 10 s of waiting for it to come back to `before`.
async fn released(pid: u32, before: (usize, usize, usize)) -> (usize, usize, usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut after = held_by(pid);
    while (after.0 > 0 || after.1 > before.1 || after.2 > 0)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = held_by(pid);
    }
    after
}

/// 200 runs, each with its namespace, proxy listener and connections: none of
/// it is left once they ended (the worker holds no namespace, no more sockets
/// than before, no child).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_left_after_200_runs() {
    nothing_left_after_200_runs(None).await;
}

/// The same under an unprivileged worker (each run's user namespace too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_left_after_200_runs_of_an_unprivileged_worker() {
    nothing_left_after_200_runs(Some(65534)).await;
}

async fn nothing_left_after_200_runs(worker_uid: Option<u32>) {
    let dir = tempfile::tempdir().expect("dir");
    let remote = RemoteHost::start(dir.path());
    let stack = stack_as(&remote, Db::Sqlite, "bubblewrap", worker_uid).await;
    stack
        .create_agent(
            "fetcher",
            json!({
                "command": ["sh", "-c", "curl -s -m 10 http://allowed.test/hello; curl -s -m 5 http://169.254.169.254/ >/dev/null; true"],
                "network": {"mode": "allowlist", "allow": ["allowed.test"], "extraHosts": extra_hosts(&remote)},
            }),
        )
        .await;
    let one = stack
        .create_run(0, json!({"agent": "fetcher", "prompt": "warm up"}))
        .await;
    let run = stack.wait_finished(&one, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "completed", "{run}");
    let pid = stack.workers[0].pid();
    let before = held_by(pid);
    let mut ids = Vec::new();
    for i in 0..200 {
        ids.push(
            stack
                .create_run(0, json!({"agent": "fetcher", "prompt": format!("run {i}")}))
                .await,
        );
    }
    for id in &ids {
        let run = stack.wait_finished(id, Duration::from_secs(300)).await;
        assert_eq!(run["status"], "completed", "{run}");
    }
    assert!(
        stack.output(&ids[199]).await.contains("hello from remote"),
        "the last run reached the remote"
    );
    let after = released(pid, before).await;
    eprintln!(
        "worker {pid}: before (netns, sockets, children) {before:?}, after 200 runs {after:?}"
    );
    assert_eq!(after.0, 0, "the worker still holds {} namespaces", after.0);
    assert!(
        after.1 <= before.1,
        "sockets: {} before, {} after",
        before.1,
        after.1
    );
    assert_eq!(after.2, 0, "the worker has children left");
    assert_eq!(stack.scratch_dirs(), 0, "scratch directories left");
}

/// The allowlist run in a microVM, checked as on bubblewrap, plus the proxy's
/// own address (port 15001, not sniffed): refused, the connection cut
/// without a reply. Its logs.
async fn microvm_allowlisted(stack: &Stack, remote: &RemoteHost) -> Vec<Value> {
    let (out, logs) = allowlisted_run(stack, remote, On::MicroVm).await;
    assert!(cut_without_reply(line(&out, "proxy")), "{out}");
    logs
}

/// A QEMU microVM of an unprivileged worker: the tap in the worker's own user
/// namespace, the same policy, the same logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unprivileged_workers_microvm_reaches_what_its_policy_allows() {
    assert!(
        std::env::var("VM0_GUEST_AGENT").is_ok(),
        "VM0_GUEST_AGENT is not set: run scripts/test.sh, which builds the static guest agent"
    );
    // The worker's own image, built ahead (the shared cache is root's): what
    // it finds there it uses without writing.
    let cache = std::env::var("VM0_IMAGE_CACHE").expect("VM0_IMAGE_CACHE");
    vm0_sandbox::image::build(&vm0_sandbox::image::ImageRecipe {
        guest_agent: std::env::var("VM0_GUEST_AGENT")
            .expect("VM0_GUEST_AGENT")
            .into(),
        busybox: "/bin/busybox".into(),
        kernel_package: None,
        cache_dir: cache.into(),
        rootfs: None,
    })
    .expect("the default image builds");
    client_image();
    let tun = std::fs::metadata("/dev/net/tun").expect("/dev/net/tun");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&tun.permissions()) & 0o006,
        0o006,
        "/dev/net/tun is not open to every user (Debian's udev makes it 0666; \
         scripts/test.sh does where a container left it 0600)"
    );
    let dir = tempfile::tempdir().expect("dir");
    let remote = RemoteHost::start(dir.path());
    let stack = stack_as(&remote, Db::Sqlite, "qemu", Some(65534)).await;
    microvm_allowlisted(&stack, &remote).await;
    let after = released(stack.workers[0].pid(), (0, usize::MAX, 0)).await;
    assert_eq!(after.0, 0, "the worker still holds {} namespaces", after.0);
}

/// A guest image whose root filesystem holds this machine's `bash` and `curl`
/// (with the libraries they load) and busybox: the client tools of the
/// bubblewrap tests, in a microVM. The tree is kept beside the image cache,
/// so that its fingerprint, and the image, are built once.
fn client_image() -> &'static str {
    const NAME: &str = "net-client";
    let cache =
        std::path::PathBuf::from(std::env::var("VM0_IMAGE_CACHE").expect("VM0_IMAGE_CACHE"));
    let tree = cache.with_file_name("net-client-tree");
    if !tree.join("usr/bin/curl").exists() {
        let staging = tree.with_extension("partial");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(staging.join("usr/bin")).expect("tree");
        std::fs::create_dir_all(staging.join("bin")).expect("tree");
        std::fs::create_dir_all(staging.join("etc")).expect("tree");
        for program in ["/usr/bin/curl", "/usr/bin/bash"] {
            let to = staging.join(program.trim_start_matches('/'));
            std::fs::copy(program, &to).expect(program);
            let ldd = Command::new("ldd").arg(program).output().expect("ldd");
            let libs = String::from_utf8_lossy(&ldd.stdout).into_owned();
            for lib in libs.split_whitespace().filter(|w| w.starts_with('/')) {
                let to = staging.join(lib.trim_start_matches('/'));
                std::fs::create_dir_all(to.parent().expect("dir")).expect("lib dir");
                std::fs::copy(lib, &to).expect(lib);
            }
        }
        std::fs::copy("/bin/busybox", staging.join("bin/busybox")).expect("busybox");
        for applet in ["sh", "sleep", "cat"] {
            std::os::unix::fs::symlink("busybox", staging.join("bin").join(applet))
                .expect("applet");
        }
        std::fs::rename(&staging, &tree).expect("tree in place");
    }
    let image = vm0_sandbox::image::build(&vm0_sandbox::image::ImageRecipe {
        guest_agent: std::env::var("VM0_GUEST_AGENT")
            .expect("VM0_GUEST_AGENT")
            .into(),
        busybox: "/bin/busybox".into(),
        kernel_package: None,
        cache_dir: cache.clone(),
        rootfs: Some(tree),
    })
    .expect("the client image builds");
    vm0_sandbox::image::ImageCatalog::new(&cache)
        .set_name(NAME, &image)
        .expect("named");
    NAME
}

/// Runs of the leak check in the QEMU test beyond its two.
const VM_RUNS: u64 = 8;

/// QEMU: the guest's network card is a tap in the run's namespace, and the
/// same proxy decides. An allowlisted name answers by HTTP and by TLS (SNI), an
/// address by rule over plain TCP; a name off the list does not resolve; the
/// metadata address, NATS, the control plane, the guest's loopback and the
/// proxy's own address are refused; `none` reaches nothing; each attempt is
/// logged; the metrics count the bytes; and no namespace, tap, socket or child
/// outlives the runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_microvm_reaches_what_its_policy_allows_and_nothing_else() {
    assert!(
        std::env::var("VM0_GUEST_AGENT").is_ok(),
        "VM0_GUEST_AGENT is not set: run scripts/test.sh, which builds the static guest agent"
    );
    let dir = tempfile::tempdir().expect("dir");
    let remote = RemoteHost::start(dir.path());
    let stack = stack_on(&remote, Db::Sqlite, "qemu").await;
    let pid = stack.workers[0].pid();
    let logs = microvm_allowlisted(&stack, &remote).await;
    let proxy = find(
        &network_logs(&logs),
        &vm0_egress::netns::TAP_GATEWAY.to_string(),
        15001,
    );
    assert_eq!(proxy["metadata"]["action"], "deny", "{proxy}");

    let before = held_by(pid);
    let (run, out, logs) = run_script(
        &stack,
        &remote,
        "vm-offline",
        json!({"mode": "none", "extraHosts": extra_hosts(&remote)}),
        On::MicroVm,
    )
    .await;
    assert_offline(&remote, &run, &out, &logs);

    // More runs, each with its namespace, tap and connections (200 were
    // measured once: docs/benchmarks.md; every run costs a TCG boot here).
    stack
        .create_agent(
            "vm-fetcher",
            json!({
                "command": ["bash", "-c", "curl -s -m 10 http://allowed.test/hello"],
                "image": client_image(),
                "resources": {"memoryMb": 256},
                "network": {"mode": "allowlist", "allow": ["allowed.test"], "extraHosts": extra_hosts(&remote)},
            }),
        )
        .await;
    let mut ids = Vec::new();
    for i in 0..VM_RUNS {
        ids.push(
            stack
                .create_run(
                    0,
                    json!({"agent": "vm-fetcher", "prompt": format!("run {i}")}),
                )
                .await,
        );
    }
    for id in &ids {
        let run = stack
            .wait_finished(id, Duration::from_secs(60 + 10 * VM_RUNS))
            .await;
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(stack.output(id).await, "hello from remote\n");
    }

    let after = released(pid, before).await;
    eprintln!(
        "worker {pid}: before (netns, sockets, children) {before:?}, after {} more VM runs {after:?}",
        VM_RUNS + 1
    );
    assert_eq!(
        after.0, 0,
        "the worker still holds {} namespaces or taps",
        after.0
    );
    assert!(
        after.1 <= before.1,
        "sockets: {} before, {} after",
        before.1,
        after.1
    );
    assert_eq!(after.2, 0, "the worker has children left");
}

/// `secretHeaders`: a secret bound to a host reaches that host as a header of
/// the run's HTTPS requests (replacing one the run sent), through TLS the
/// proxy ends with the run's own CA, which the sandbox trusts; the secret is
/// not in the run's environment, not sent over plain HTTP, and in no log; a run
/// without the secret is refused at creation.
async fn secret_headers_on(sandbox: &'static str) {
    let dir = tempfile::tempdir().expect("dir");
    let remote = RemoteHost::start(dir.path());
    // A host the run may reach by address, which the proxy would trust as
    // secure.test too: where a run that steers the secret's host would want it.
    let attacker = RemoteHost::start(dir.path());
    let roots = dir.path().join("remote-ca.pem");
    std::fs::write(&roots, format!("{}{}", remote.ca_pem, attacker.ca_pem)).expect("roots");
    let stack = Stack::start(
        Db::Sqlite,
        StackOptions {
            sandbox,
            worker_env: vec![
                (
                    "VM0_NETWORK_TRUSTED_CIDRS",
                    format!("{},{}", remote.subnet, attacker.subnet),
                ),
                ("VM0_NETWORK_TLS_CA_FILE", roots.display().to_string()),
            ],
            ..Default::default()
        },
    )
    .await;
    let script = format!(
        r#"
c=0; for v in $(compgen -e); do [[ $v == REMOTE_KEY || ${{!v}} == *s3cr3t* ]] && c=$((c+1)); done; echo "env:$c"
echo "tls:$(curl -s -m 10 https://secure.test/key)"
echo "forged:$(curl -s -m 10 -H 'X-Api-Key: forged' https://secure.test/key)"
echo "plain:$(curl -s -m 10 http://secure.test/key)"
echo "steered:$(curl -s -m 10 --resolve secure.test:443:{at} https://secure.test/key)"
echo "bare:$(curl -s -m 10 -k -H 'Host: secure.test' https://{at}/key)"
"#,
        at = attacker.ip
    );
    let mut config = json!({
        "command": ["bash", "-c", script],
        "network": {
            "mode": "allowlist",
            "allow": ["secure.test", attacker.ip],
            "extraHosts": extra_hosts(&remote),
            "secretHeaders": {"secure.test": {"X-Api-Key": "REMOTE_KEY"}},
        },
    });
    if sandbox == "qemu" {
        config["image"] = client_image().into();
        config["resources"] = json!({"memoryMb": 256});
    }
    stack.create_agent("keyed", config).await;
    let (status, body) = stack
        .call(
            0,
            reqwest::Method::POST,
            "/v1/runs",
            Some(json!({"agent": "keyed", "prompt": "go"})),
        )
        .await;
    assert_eq!(status.as_u16(), 400, "{body}");
    assert_eq!(body["error"]["param"], "secrets.REMOTE_KEY", "{body}");

    let secret = "s3cr3t-value-for-the-remote";
    let id = stack
        .create_run(
            0,
            json!({"agent": "keyed", "prompt": "go", "secrets": {"REMOTE_KEY": secret}}),
        )
        .await;
    let run = stack.wait_finished(&id, Duration::from_secs(180)).await;
    let out = stack.output(&id).await;
    assert_eq!(run["status"], "completed", "{run}\n{out}");
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(secret.as_bytes()))
    };
    assert_eq!(
        line(&out, "env"),
        "0",
        "the secret is not in the run: {out}"
    );
    let at_remote = format!("key-sha256={digest} at={}", remote.ip);
    assert_eq!(line(&out, "tls"), at_remote, "{out}");
    assert_eq!(
        line(&out, "forged"),
        at_remote,
        "the secret replaces the run's header: {out}"
    );
    assert_eq!(
        line(&out, "plain"),
        format!("key-sha256=none at={}", remote.ip),
        "not over plain HTTP: {out}"
    );
    // The run points secure.test's TLS at its own host: the proxy connects to
    // where it resolves the name, and the attacker's host never sees the key.
    assert_eq!(line(&out, "steered"), at_remote, "{out}");
    assert_eq!(
        line(&out, "bare"),
        format!("key-sha256=none at={}", attacker.ip),
        "a connection without the secret's name gets no secret: {out}"
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut logs = stack.logs(&id).await;
    while network_logs(&logs).len() < 5 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        logs = stack.logs(&id).await;
    }
    let net = network_logs(&logs);
    let intercepted: Vec<&&Value> = net
        .iter()
        .filter(|l| l["metadata"]["mode"] == "mitm")
        .collect();
    assert_eq!(intercepted.len(), 3, "{net:#?}");
    for l in intercepted {
        assert_eq!(l["metadata"]["action"], "allow", "{l}");
        assert_eq!(l["metadata"]["status"], 200, "{l}");
        assert_eq!(l["metadata"]["url"], "https://secure.test/key", "{l}");
        assert_eq!(
            l["message"],
            format!(
                "GET https://secure.test/key - 200 ({}ms)",
                l["metadata"]["durationMs"]
            ),
            "{l}"
        );
    }
    let everything = serde_json::to_string(&logs).expect("logs") + &out;
    assert!(
        !everything.contains(secret),
        "the secret in a log or the output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_header_reaches_its_host_and_never_the_run() {
    secret_headers_on("bubblewrap").await;
}

/// The same in a microVM: the run's CA reaches the guest as a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_header_reaches_its_host_from_a_microvm() {
    assert!(
        std::env::var("VM0_GUEST_AGENT").is_ok(),
        "VM0_GUEST_AGENT is not set: run scripts/test.sh, which builds the static guest agent"
    );
    secret_headers_on("qemu").await;
}
