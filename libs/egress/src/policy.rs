//! An agent's network policy (`config.network`): its rules, parsed once (the API
//! refuses what does not parse, naming it) and matched by the worker's proxy.
//!
//! A rule is a host name (`api.anthropic.com`), a wildcard over a name's
//! subdomains (`*.github.com`: `api.github.com`, not `github.com`), an address
//! or a CIDR range (`203.0.113.0/24`), each with an optional `:port` (not on
//! ranges). Names match what the connection shows (the HTTP `Host`, the TLS
//! SNI, or the name the run itself resolved for the address); addresses and
//! ranges match the address connected to.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The most rules an `allow` or `deny` list holds, and names `extraHosts` holds.
pub const MAX_RULES: usize = 256;
/// The longest rule (a 253-byte name and a port).
pub const MAX_RULE_LEN: usize = 260;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Everything but what `deny` names (and what is always refused).
    #[default]
    Open,
    /// Only what `allow` names, and not what `deny` names.
    Allowlist,
    /// Nothing.
    None,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "open" | "" => Some(Mode::Open),
            "allowlist" => Some(Mode::Allowlist),
            "none" => Some(Mode::None),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Open => "open",
            Mode::Allowlist => "allowlist",
            Mode::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("a rule may not be empty")]
    Empty,
    #[error("a rule is at most {MAX_RULE_LEN} characters")]
    TooLong,
    #[error("'{0}' is not a host name, *.name, address or CIDR range (with an optional :port)")]
    Malformed(String),
    #[error("'{0}': a port is 1-65535")]
    Port(String),
    #[error("'{0}': a CIDR prefix is at most 32 (IPv4) or 128 (IPv6)")]
    Prefix(String),
}

/// An address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// The range of one address.
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            prefix: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = s.parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        Cidr::parse(s.trim())
            .ok_or_else(|| format!("{s:?} is not an address or a CIDR block (10.0.0.0/8)"))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `s` as a number written the one way `to_string` writes it (no sign, no
/// leading zeros), so that the documented pattern can say what is accepted.
fn canonical_number<T: std::str::FromStr + ToString>(s: &str) -> Option<T> {
    let n = s.parse::<T>().ok()?;
    (n.to_string() == s).then_some(n)
}

fn rule_port(rule: &str, port: &str) -> Result<u16, RuleError> {
    canonical_number::<u16>(port)
        .filter(|p| *p > 0)
        .ok_or_else(|| RuleError::Port(rule.to_owned()))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A name, or with `subdomains` every name under it.
    Name {
        name: String,
        subdomains: bool,
    },
    Range(Cidr),
}

/// One rule of `allow` or `deny`, as written and as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    text: String,
    target: Target,
    port: Option<u16>,
}

impl Rule {
    /// Parses a rule as written: canonical forms only (no surrounding space,
    /// no leading zeros in a port or prefix), so that [`rule_pattern`] can say
    /// exactly what is accepted.
    pub fn parse(text: &str) -> Result<Rule, RuleError> {
        let s = text;
        if s.is_empty() {
            return Err(RuleError::Empty);
        }
        if s.len() > MAX_RULE_LEN {
            return Err(RuleError::TooLong);
        }
        let malformed = || RuleError::Malformed(s.to_owned());
        if let Some((addr, prefix)) = s.split_once('/') {
            let addr = addr.parse::<IpAddr>().map_err(|_| malformed())?;
            let prefix = canonical_number::<u8>(prefix).ok_or_else(malformed)?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            if prefix > max {
                return Err(RuleError::Prefix(s.to_owned()));
            }
            return Ok(Rule::new(s, Target::Range(Cidr { addr, prefix }), None));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Rule::new(s, Target::Range(Cidr::host(ip)), None));
        }
        if let Some(bracketed) = s.strip_prefix('[') {
            let (addr, port) = bracketed.split_once("]:").ok_or_else(malformed)?;
            let addr = addr.parse::<Ipv6Addr>().map_err(|_| malformed())?;
            let port = rule_port(s, port)?;
            return Ok(Rule::new(
                s,
                Target::Range(Cidr::host(IpAddr::V6(addr))),
                Some(port),
            ));
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((host, port)) => (host, Some(rule_port(s, port)?)),
            None => (s, None),
        };
        if let Ok(v4) = host.parse::<Ipv4Addr>() {
            return Ok(Rule::new(
                s,
                Target::Range(Cidr::host(IpAddr::V4(v4))),
                port,
            ));
        }
        let (name, subdomains) = match host.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (host, false),
        };
        let name = host_name(name).ok_or_else(malformed)?;
        Ok(Rule::new(s, Target::Name { name, subdomains }, port))
    }

    fn new(text: &str, target: Target, port: Option<u16>) -> Rule {
        Rule {
            text: text.to_owned(),
            target,
            port,
        }
    }

    /// The rule as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn port_matches(&self, port: Option<u16>) -> bool {
        match (self.port, port) {
            (None, _) => true,
            (Some(want), Some(port)) => want == port,
            // A DNS lookup has no port yet: a name rule with one still lets it
            // resolve.
            (Some(_), None) => true,
        }
    }

    fn name_matches(&self, name: &str) -> bool {
        match &self.target {
            Target::Name {
                name: want,
                subdomains: false,
            } => name == want,
            Target::Name {
                name: want,
                subdomains: true,
            } => name
                .strip_suffix(want.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            Target::Range(_) => false,
        }
    }

    /// Whether the rule names this connection: `name` if the connection shows
    /// one, `ip` the address it goes to (when known), `port` its port (none for
    /// a DNS lookup).
    pub fn matches(&self, name: Option<&str>, ip: Option<IpAddr>, port: Option<u16>) -> bool {
        if !self.port_matches(port) {
            return false;
        }
        match &self.target {
            Target::Range(range) => ip.is_some_and(|ip| range.contains(ip)),
            Target::Name { .. } => name.is_some_and(|n| self.name_matches(n)),
        }
    }

    fn is_name(&self) -> bool {
        matches!(self.target, Target::Name { .. })
    }
}

/// One IPv4 octet as `Ipv4Addr` parses it (no leading zeros).
const OCTET: &str = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
/// A port as [`Rule::parse`] takes it: 1-65535, no leading zeros.
const PORT: &str =
    "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])";
/// A label of a host name ([`host_name`]).
const LABEL: &str = "[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?";

/// An IPv4 address (unanchored), for patterns in the API's document.
pub fn ipv4_pattern() -> String {
    format!("{OCTET}\\.{OCTET}\\.{OCTET}\\.{OCTET}")
}

/// An IPv6 address as `Ipv6Addr` parses it (RFC 4291's text forms, an IPv4
/// address in the last 32 bits allowed), unanchored.
fn ipv6_pattern() -> String {
    let h = "[0-9A-Fa-f]{1,4}";
    let ls32 = format!("({h}:{h}|{})", ipv4_pattern());
    let head = |n: usize| format!("(({h}:){{0,{n}}}{h})?");
    [
        format!("({h}:){{6}}{ls32}"),
        format!("::({h}:){{5}}{ls32}"),
        format!("{}::({h}:){{4}}{ls32}", head(0)),
        format!("{}::({h}:){{3}}{ls32}", head(1)),
        format!("{}::({h}:){{2}}{ls32}", head(2)),
        format!("{}::{h}:{ls32}", head(3)),
        format!("{}::{ls32}", head(4)),
        format!("{}::{h}", head(5)),
        format!("{}::", head(6)),
    ]
    .map(|form| format!("({form})"))
    .join("|")
}

/// A host name as [`host_name`] takes it (dot-separated labels of letters,
/// digits, `-` not at either end and `_`, an optional final dot, never an
/// IPv4 address), anchored. The 253-character limit is not in it.
pub fn host_name_pattern() -> String {
    format!("^(?!{}\\.?$){LABEL}(\\.{LABEL})*\\.?$", ipv4_pattern())
}

/// What [`Rule::parse`] accepts, anchored, for the API's document: an address
/// or range (`1.2.3.4`, `1.2.3.0/24`, `2001:db8::/32`), an address and port
/// (`1.2.3.4:5432`, `[2001:db8::1]:443`), or a name or `*.`name with an
/// optional port. Names beyond 253 characters are refused without it saying so.
pub fn rule_pattern() -> String {
    let v4 = ipv4_pattern();
    let v6 = format!("({})", ipv6_pattern());
    let v4_prefix = "([0-9]|[12][0-9]|3[0-2])";
    let v6_prefix = "([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8])";
    let name = format!("(?!(\\*\\.)?{v4}\\.?(:|$))(\\*\\.)?{LABEL}(\\.{LABEL})*\\.?");
    format!(
        "^({v4}(/{v4_prefix}|:{PORT})?|{v6}(/{v6_prefix})?|\\[{v6}\\]:{PORT}|{name}(:{PORT})?)$"
    )
}

/// Whether `value` can be sent as an HTTP header value: no control character
/// but tab (a CR or LF would end the header and start another).
pub fn is_header_value(value: &str) -> bool {
    !value.chars().any(|c| c.is_control() && c != '\t')
}

/// A host name in the form rules compare: lowercase, without a trailing dot;
/// `None` if it is not one (labels of 1-63 letters, digits, `-` or `_`, not
/// starting or ending with `-`, 253 bytes in all, not an IPv4 address).
pub fn host_name(s: &str) -> Option<String> {
    let s = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if s.is_empty() || s.len() > 253 || s.parse::<Ipv4Addr>().is_ok() {
        return None;
    }
    let ok = s.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    ok.then_some(s)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("mode must be one of open, allowlist, none")]
    Mode,
    #[error("{list}[{index}]: {error}")]
    Rule {
        list: &'static str,
        index: usize,
        error: RuleError,
    },
    #[error("{list} holds at most {MAX_RULES} entries")]
    TooMany { list: &'static str },
    #[error("extraHosts: '{0}' is not a host name")]
    ExtraHostName(String),
    #[error("extraHosts.{0}: the address must be an IPv4 address")]
    ExtraHostAddr(String),
}

impl PolicyError {
    /// Where the error is, under `config.network` (`allow[2]`, `extraHosts.x`).
    pub fn param(&self) -> String {
        match self {
            PolicyError::Mode => "mode".into(),
            PolicyError::Rule { list, index, .. } => format!("{list}[{index}]"),
            PolicyError::TooMany { list } => (*list).into(),
            PolicyError::ExtraHostName(name) | PolicyError::ExtraHostAddr(name) => {
                format!("extraHosts.{name}")
            }
        }
    }
}

/// Why a connection or lookup was allowed or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow { rule: String },
    Deny { rule: String },
}

impl Verdict {
    pub fn rule(&self) -> &str {
        match self {
            Verdict::Allow { rule } | Verdict::Deny { rule } => rule,
        }
    }

    pub fn allowed(&self) -> bool {
        matches!(self, Verdict::Allow { .. })
    }
}

/// A run's policy, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    pub mode: Mode,
    allow: Vec<Rule>,
    deny: Vec<Rule>,
    extra_hosts: BTreeMap<String, Ipv4Addr>,
}

impl Policy {
    /// Nothing reachable (`mode: none`).
    pub fn none() -> Policy {
        Policy {
            mode: Mode::None,
            ..Policy::default()
        }
    }

    pub fn parse<'a>(
        mode: &str,
        allow: impl IntoIterator<Item = &'a str>,
        deny: impl IntoIterator<Item = &'a str>,
        extra_hosts: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Policy, PolicyError> {
        let mode = Mode::parse(mode).ok_or(PolicyError::Mode)?;
        let rules = |list: &'static str, texts: Vec<&str>| {
            if texts.len() > MAX_RULES {
                return Err(PolicyError::TooMany { list });
            }
            texts
                .into_iter()
                .enumerate()
                .map(|(index, t)| {
                    Rule::parse(t).map_err(|error| PolicyError::Rule { list, index, error })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let allow = rules("allow", allow.into_iter().collect())?;
        let deny = rules("deny", deny.into_iter().collect())?;
        let mut hosts = BTreeMap::new();
        for (name, addr) in extra_hosts {
            if hosts.len() == MAX_RULES {
                return Err(PolicyError::TooMany { list: "extraHosts" });
            }
            let key = host_name(name).ok_or_else(|| PolicyError::ExtraHostName(name.into()))?;
            let addr = addr
                .parse::<Ipv4Addr>()
                .map_err(|_| PolicyError::ExtraHostAddr(name.into()))?;
            hosts.insert(key, addr);
        }
        Ok(Policy {
            mode,
            allow,
            deny,
            extra_hosts: hosts,
        })
    }

    /// The address `extraHosts` gives `name` (already in rule form).
    pub fn extra_host(&self, name: &str) -> Option<Ipv4Addr> {
        self.extra_hosts.get(name).copied()
    }

    /// The verdict on a connection (`port` set) or a lookup (`port` none).
    /// What is always refused (loopback, private ranges...) is decided apart,
    /// on the address actually connected to.
    pub fn decide(&self, name: Option<&str>, ip: Option<IpAddr>, port: Option<u16>) -> Verdict {
        self.judge(|r| r.matches(name, ip, port), |r| r.matches(name, ip, port))
    }

    /// The verdict on a DNS lookup of `name`: a name is resolved unless the
    /// policy could never let a connection to it through by name. In allowlist
    /// mode only names an allow rule names resolve (address rules do not need
    /// DNS). A deny rule with a port still lets the name resolve (other ports
    /// may be allowed).
    pub fn lookup(&self, name: &str) -> Verdict {
        self.judge(
            |r| r.is_name() && r.port.is_none() && r.name_matches(name),
            |r| r.name_matches(name),
        )
    }

    /// The order every verdict follows: `none` refuses, then a matching deny
    /// rule, then `open` allows, then a matching allow rule, else refused.
    fn judge(&self, denies: impl Fn(&Rule) -> bool, allows: impl Fn(&Rule) -> bool) -> Verdict {
        if self.mode == Mode::None {
            return Verdict::Deny {
                rule: "mode none".into(),
            };
        }
        if let Some(rule) = self.deny.iter().find(|r| denies(r)) {
            return Verdict::Deny {
                rule: format!("deny {}", rule.as_str()),
            };
        }
        if self.mode == Mode::Open {
            return Verdict::Allow {
                rule: "mode open".into(),
            };
        }
        match self.allow.iter().find(|r| allows(r)) {
            Some(rule) => Verdict::Allow {
                rule: format!("allow {}", rule.as_str()),
            },
            None => Verdict::Deny {
                rule: "not in allow".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: &str, allow: &[&str], deny: &[&str]) -> Policy {
        Policy::parse(mode, allow.iter().copied(), deny.iter().copied(), []).expect("policy")
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("ip"))
    }

    /// Strings near the grammar's edges: pieces of addresses, names, ports
    /// and prefixes, joined at random (a fixed seed), and the hand-picked ones.
    fn rule_candidates() -> Vec<String> {
        const PIECES: &[&str] = &[
            "1", "0", "00", "01", "9", "10", "32", "33", "99", "128", "129", "255", "256", "65535",
            "65536", "080", "+1", "ffff", "FfFf", "12345", "db8", "a", "Z", "ab-c", "-", "_",
            "x_y", "com", ".", ".", ":", ":", "::", "/", "/", "*.", "*", "[", "]", " ", "1.2.3.4",
            "%", "\n",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % n as u64).unwrap_or(0)
        };
        let mut out: Vec<String> = VALID_RULES
            .iter()
            .chain(&[
                "::",
                "::1",
                "1::",
                "1:2:3:4:5:6:7:8",
                "1:2:3:4:5:6:7::",
                "::2:3:4:5:6:7:8",
                "1:2:3:4:5:6:1.2.3.4",
                "::ffff:1.2.3.4",
                "1::1.2.3.4",
                "[::1]:80",
                "[::1]",
                "[1.2.3.4]:80",
                "1.2.3.4.",
                "*.1.2.3.4",
                "1.2.3.4.:80",
                "1.2.3",
                "80",
                "a.com:080",
                "1.2.3.0/08",
                "1.2.3.0/+8",
                " a.com",
                "a.com ",
                "01.2.3.4",
                "1:2:3:4:5:6:7:8:9",
                "1:2:3:4:5:6:7:8::",
                "::1.2.3.4",
                "a.com\n",
                "[::1%1]:80",
                "fe80::1%1",
            ])
            .map(|s| (*s).to_owned())
            .collect();
        for _ in 0..20_000 {
            let len = 1 + next(8);
            out.push((0..len).map(|_| PIECES[next(PIECES.len())]).collect());
        }
        out
    }

    /// Which of `candidates` the regular expression `pattern` matches as a
    /// JSON Schema validator does (anchored by the pattern itself), in Python's
    /// `re`, the engine Schemathesis generates and checks with.
    fn python_matches(pattern: &str, candidates: &[String]) -> Vec<bool> {
        use std::io::Write;
        let script = "import json,re,sys\n\
                      d=json.load(sys.stdin)\n\
                      p=re.compile(d['p'])\n\
                      print(json.dumps([p.fullmatch(c) is not None for c in d['c']]))";
        let mut child = std::process::Command::new("python3")
            .args(["-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (the test command installs it) checks the patterns");
        let input = serde_json::json!({"p": pattern, "c": candidates}).to_string();
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("verdicts")
    }

    #[test]
    fn the_documented_patterns_accept_exactly_what_parses() {
        let candidates = rule_candidates();
        let verdicts = python_matches(&rule_pattern(), &candidates);
        let mut valid = 0;
        for (c, matched) in candidates.iter().zip(verdicts) {
            let parsed = Rule::parse(c);
            assert_eq!(
                parsed.is_ok(),
                matched,
                "{c:?}: {parsed:?}, pattern says {matched}"
            );
            valid += usize::from(matched);
        }
        assert!(
            valid > 1000,
            "enough valid rules among the candidates: {valid}"
        );
        let names: Vec<String> = candidates
            .into_iter()
            .filter(|c| !c.contains(':'))
            .collect();
        let verdicts = python_matches(&host_name_pattern(), &names);
        for (c, matched) in names.iter().zip(verdicts) {
            assert_eq!(
                host_name(c).is_some(),
                matched,
                "{c:?}: the pattern says {matched}"
            );
        }
    }

    const VALID_RULES: &[&str] = &[
        "api.anthropic.com",
        "*.github.com",
        "203.0.113.0/24",
        "example.test:8080",
        "1.2.3.4",
        "1.2.3.4:5432",
        "2001:db8::/32",
        "[2001:db8::1]:443",
        "API.Example.COM.",
    ];

    #[test]
    fn rules_parse_and_refuse() {
        for ok in VALID_RULES {
            Rule::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "exa mple.com",
            "a..b",
            "-a.com",
            "*.",
            "**.a.com",
            "a.com:0",
            "a.com:70000",
            "a.com:x",
            "1.2.3.0/33",
            "1.2.3.0/x",
            "x/24",
            "http://a.com",
            "a.com/path",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(Rule::parse(&"a".repeat(300)).is_err());
    }

    #[test]
    fn names_match_exactly_or_by_subdomain() {
        let p = policy("allowlist", &["api.anthropic.com", "*.github.com"], &[]);
        let allowed = |n: &str| p.decide(Some(n), None, Some(443)).allowed();
        assert!(allowed("api.anthropic.com"));
        assert!(allowed("api.github.com"));
        assert!(allowed("a.b.github.com"));
        assert!(!allowed("github.com"), "*.x is x's subdomains only");
        assert!(!allowed("evilgithub.com"));
        assert!(!allowed("anthropic.com"));
        assert!(!allowed("api.anthropic.com.evil.test"));
    }

    #[test]
    fn ports_and_ranges() {
        let p = policy("allowlist", &["example.test:8080", "203.0.113.0/24"], &[]);
        assert!(p.decide(Some("example.test"), None, Some(8080)).allowed());
        assert!(!p.decide(Some("example.test"), None, Some(80)).allowed());
        assert!(p.decide(None, ip("203.0.113.9"), Some(22)).allowed());
        assert!(
            p.decide(Some("x.test"), ip("203.0.113.9"), Some(443))
                .allowed()
        );
        assert!(!p.decide(None, ip("203.0.114.1"), Some(22)).allowed());
        assert!(p.decide(None, ip("::ffff:203.0.113.9"), Some(22)).allowed());
        // A lookup: the name with a port rule resolves; one with none does not.
        assert!(p.lookup("example.test").allowed());
        assert!(!p.lookup("other.test").allowed());
    }

    #[test]
    fn deny_wins_and_none_refuses_all() {
        let p = policy("open", &[], &["*.evil.test", "10.0.0.0/8", "a.test:25"]);
        assert!(p.decide(Some("good.test"), None, Some(443)).allowed());
        let v = p.decide(Some("x.evil.test"), None, Some(443));
        assert_eq!(
            v,
            Verdict::Deny {
                rule: "deny *.evil.test".into()
            }
        );
        assert!(!p.decide(None, ip("10.1.2.3"), Some(80)).allowed());
        assert!(!p.decide(Some("a.test"), None, Some(25)).allowed());
        assert!(p.decide(Some("a.test"), None, Some(443)).allowed());
        assert!(p.lookup("a.test").allowed());
        assert!(!p.lookup("x.evil.test").allowed());
        let none = Policy::none();
        assert!(
            !none
                .decide(Some("a.test"), ip("1.1.1.1"), Some(443))
                .allowed()
        );
        assert!(!none.lookup("a.test").allowed());
        let both = policy("allowlist", &["*.test"], &["bad.test"]);
        assert!(!both.decide(Some("bad.test"), None, Some(80)).allowed());
        assert!(both.decide(Some("ok.test"), None, Some(80)).allowed());
    }

    #[test]
    fn errors_name_their_place() {
        let e = Policy::parse("sometimes", [], [], []).expect_err("mode");
        assert_eq!(e.param(), "mode");
        let e = Policy::parse("open", ["a.com", "bad rule"], [], []).expect_err("rule");
        assert_eq!(e.param(), "allow[1]");
        let e = Policy::parse("open", [], [], [("a.test", "not-an-ip")]).expect_err("host");
        assert_eq!(e.param(), "extraHosts.a.test");
        let e = Policy::parse("open", [], [], [("bad name", "1.2.3.4")]).expect_err("host");
        assert_eq!(e.param(), "extraHosts.bad name");
        let many: Vec<String> = (0..=MAX_RULES).map(|i| format!("h{i}.test")).collect();
        let e = Policy::parse("open", [], many.iter().map(String::as_str), []).expect_err("many");
        assert_eq!(e.param(), "deny");
        let p = Policy::parse("open", [], [], [("Example.Test", "10.1.2.3")]).expect("ok");
        assert_eq!(
            p.extra_host("example.test"),
            Some(Ipv4Addr::new(10, 1, 2, 3))
        );
    }

    #[test]
    fn ranges_contain() {
        let c = Cidr::parse("10.0.0.0/8").expect("cidr");
        assert!(c.contains("10.255.0.1".parse().expect("ip")));
        assert!(!c.contains("11.0.0.1".parse().expect("ip")));
        let all = Cidr::parse("0.0.0.0/0").expect("cidr");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
        let v6 = Cidr::parse("fc00::/7").expect("cidr");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        assert!(!v6.contains("10.0.0.1".parse().expect("ip")));
    }
}
