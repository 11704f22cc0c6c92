//! What the real-cluster tests share: running kubectl (against the cluster KUBECONFIG names, or another),
//! bounded waits, and ways to talk SMTP and IMAP to a Service. Each test crate uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The password of every mailbox the tests create.
pub const PASSWORD: &str = "e2e-password";

/// Whether to run; panics when a cluster is required and none is given.
pub fn cluster_given(test: &str) -> bool {
    if std::env::var_os("KUBECONFIG").is_some_and(|k| !k.is_empty()) {
        return true;
    }
    assert!(
        std::env::var("MAILPOD_E2E_REQUIRED").as_deref() != Ok("1"),
        "{test}: MAILPOD_E2E_REQUIRED=1 but KUBECONFIG is not set; run e2e/kind-up.sh and export KUBECONFIG"
    );
    eprintln!(
        "SKIPPED {test}: KUBECONFIG is not set (e2e tests need a cluster with the chart installed; see e2e/README.md)"
    );
    false
}

pub fn timeout() -> Duration {
    Duration::from_secs(
        std::env::var("MAILPOD_E2E_TIMEOUT_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(600),
    )
}

pub fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// The kubectl to run: `KUBECTL`, else the one on PATH.
pub fn kubectl_bin() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_string())
}

/// Runs `program` with `args` (and `stdin`), returning its output, or its error output when it fails.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    run(&kubectl_bin(), args, stdin)
}

pub fn must(args: &[&str]) -> String {
    kubectl(args, None).unwrap_or_else(|e| panic!("{e}"))
}

pub fn get_json(ns: &str, what: &[&str]) -> Option<Value> {
    let mut args = vec!["get", "-n", ns, "-o", "json"];
    args.extend(what);
    kubectl(&args, None)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("kubectl prints JSON"))
}

/// Polls `check` until it returns Some, or panics with `what` and the last observation.
pub fn wait_for<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout();
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!(
                    "timed out after {:?} waiting for {what}; last: {last}",
                    timeout()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_secs(3)),
        }
    }
}

pub fn condition(obj: &Value, kind: &str) -> Option<String> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str().map(String::from))
}

/// `kubectl port-forward` to a Service port; stopped on drop.
pub struct PortForward {
    child: Child,
    port: u16,
}

impl PortForward {
    pub fn new(ns: &str, service: &str, port: u16) -> Self {
        let mut child = Command::new(kubectl_bin())
            .args([
                "port-forward",
                "-n",
                ns,
                &format!("service/{service}"),
                &format!(":{port}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl port-forward");
        // "Forwarding from 127.0.0.1:41234 -> 25"
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().and_then(Result::ok).unwrap_or_else(|| {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            panic!("port-forward to {service}:{port} failed: {err}")
        });
        let local = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("127.0.0.1:"))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected port-forward output: {line}"));
        // Keep draining stdout so kubectl never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { child, port: local }
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect through port-forward");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A way to a Service port from the test: its ClusterIP where this machine routes to it (the local cluster
/// of e2e/cluster-up.sh, where the client then comes from the node's bridge address as any client outside
/// the pod would), else `kubectl port-forward` (kind), where the pod sees the client on its own loopback.
pub enum ServicePort {
    Direct(std::net::SocketAddr),
    Forward(PortForward),
}

impl From<std::net::SocketAddr> for ServicePort {
    fn from(addr: std::net::SocketAddr) -> Self {
        Self::Direct(addr)
    }
}

/// A Service's ClusterIP, as kubectl prints it.
pub fn cluster_ip(ns: &str, service: &str) -> String {
    must(&[
        "get",
        "-n",
        ns,
        "service",
        service,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])
    .trim()
    .to_string()
}

impl ServicePort {
    pub fn new(ns: &str, service: &str, port: u16) -> Self {
        if let Ok(ip) = cluster_ip(ns, service).parse::<std::net::IpAddr>() {
            let addr = std::net::SocketAddr::new(ip, port);
            if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
                return Self::Direct(addr);
            }
        }
        Self::Forward(PortForward::new(ns, service, port))
    }

    pub fn connect(&self) -> TcpStream {
        match self {
            Self::Direct(addr) => {
                let s = TcpStream::connect_timeout(addr, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s
            }
            Self::Forward(pf) => pf.connect(),
        }
    }
}

/// A line-oriented text protocol session (SMTP, IMAP).
pub struct Session {
    reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl Session {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("read from server");
        assert!(!l.is_empty(), "server closed the connection");
        l
    }

    pub fn send(&mut self, s: &str) {
        self.writer
            .write_all(format!("{s}\r\n").as_bytes())
            .unwrap();
    }

    /// Reads an SMTP reply (multi-line aware) and checks its code.
    pub fn smtp(&mut self, expect: &str) -> String {
        loop {
            let l = self.line();
            assert!(l.starts_with(expect), "SMTP: expected {expect}, got {l:?}");
            if l.as_bytes().get(3) != Some(&b'-') {
                return l;
            }
        }
    }

    /// Sends an IMAP command with `tag` and returns every line up to the tagged reply, which must be OK.
    pub fn imap(&mut self, tag: &str, cmd: &str) -> String {
        self.send(&format!("{tag} {cmd}"));
        let mut all = String::new();
        loop {
            let l = self.line();
            all.push_str(&l);
            if l.starts_with(&format!("{tag} ")) {
                assert!(l.starts_with(&format!("{tag} OK")), "IMAP {cmd}: {all}");
                return all;
            }
        }
    }
}

pub fn send_mail(ns: &str, to: &str, subject: &str) {
    send_mail_via(&ServicePort::new(ns, "small-mx", 25), to, subject);
}

/// Sends a message to `to` through an SMTP server reached by `port`.
pub fn send_mail_via(port: &ServicePort, to: &str, subject: &str) {
    let mut s = Session::new(port.connect());
    s.smtp("220");
    s.send("EHLO e2e.test");
    s.smtp("250");
    s.send("MAIL FROM:<e2e@sender.test>");
    s.smtp("250");
    s.send(&format!("RCPT TO:<{to}>"));
    s.smtp("250");
    s.send("DATA");
    s.smtp("354");
    s.send(&format!(
        "From: <e2e@sender.test>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\nSent by tests/e2e.rs.\r\n."
    ));
    s.smtp("250");
    s.send("QUIT");
    s.smtp("221");
}

/// An IMAP session through the imap Service, logged in as `user`; `Err` with the server's answer when the
/// login is refused (a store that just became active refuses logins until its agent has seen its role).
pub fn imap_session(ns: &str, user: &str) -> Result<Session, String> {
    let mut s = Session::new(ServicePort::new(ns, "small-imap", 143).connect());
    let greeting = s.line();
    if !greeting.starts_with("* OK") {
        return Err(format!("greeting {greeting:?}"));
    }
    s.send(&format!("a LOGIN {user} {PASSWORD}"));
    loop {
        let l = s.line();
        if l.is_empty() {
            return Err(format!("LOGIN {user}: connection closed"));
        }
        if l.starts_with("a ") {
            return if l.starts_with("a OK") {
                Ok(s)
            } else {
                Err(format!("LOGIN {user}: {}", l.trim()))
            };
        }
    }
}

/// Whether `user` can log in over IMAP through the imap Service now.
pub fn imap_login(ns: &str, user: &str) -> Result<(), String> {
    imap_session(ns, user)?.send("z LOGOUT");
    Ok(())
}

/// Whether `user`'s INBOX holds a message with `subject`, read over IMAP through the imap Service.
pub fn imap_has(ns: &str, user: &str, subject: &str) -> Result<(), String> {
    imap_has_via(&ServicePort::new(ns, "small-imap", 143), user, subject)
}

/// Whether `user`'s INBOX holds a message with `subject`, read over IMAP from a server reached by `port`.
pub fn imap_has_via(port: &ServicePort, user: &str, subject: &str) -> Result<(), String> {
    let mut s = Session::new(port.connect());
    let greeting = s.line();
    if !greeting.starts_with("* OK") {
        return Err(format!("greeting {greeting:?}"));
    }
    s.imap("a", &format!("LOGIN {user} {PASSWORD}"));
    s.imap("b", "SELECT INBOX");
    let found = s.imap("c", &format!("SEARCH SUBJECT \"{subject}\""));
    let ids: Vec<&str> = found
        .lines()
        .find_map(|l| l.strip_prefix("* SEARCH"))
        .map(|r| r.split_whitespace().collect())
        .unwrap_or_default();
    let Some(id) = ids.first() else {
        s.imap("z", "LOGOUT");
        return Err(format!("no message with subject {subject} yet"));
    };
    let body = s.imap("d", &format!("FETCH {id} BODY[HEADER.FIELDS (SUBJECT)]"));
    s.imap("z", "LOGOUT");
    if body.contains(subject) {
        Ok(())
    } else {
        Err(format!("FETCH returned {body}"))
    }
}

/// kubectl against the cluster `kubeconfig` names (the tests' other clusters: a peer site, a witness).
pub fn kubectl_at(kubeconfig: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut all = vec!["--kubeconfig", kubeconfig];
    all.extend_from_slice(args);
    run(&kubectl_bin(), &all, stdin)
}

/// `get -o json` against the cluster `kubeconfig` names; None when kubectl fails (absent, or unreachable).
pub fn get_json_at(kubeconfig: &str, ns: &str, what: &[&str]) -> Option<Value> {
    let mut args = vec!["get", "-n", ns, "-o", "json"];
    args.extend(what);
    kubectl_at(kubeconfig, &args, None)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("kubectl prints JSON"))
}

/// `verb resource ns/name (user)` of each request by a user `is_user` accepts that `audit_log` records as refused by
/// authorization (403).
pub fn refused(
    audit_log: &str,
    is_user: impl Fn(&str) -> bool,
    from: jiff::Timestamp,
) -> Vec<String> {
    let text = std::fs::read_to_string(audit_log).unwrap_or_else(|e| panic!("{audit_log}: {e}"));
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["stage"] == "ResponseComplete" && e["responseStatus"]["code"] == 403)
        // Writes into a namespace being deleted (a finished scenario's) are refused with 403 too; not RBAC.
        .filter(|e| {
            !e["responseStatus"]["details"]["causes"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["reason"] == "NamespaceTerminating"))
        })
        .filter(|e| e["user"]["username"].as_str().is_some_and(&is_user))
        .filter(|e| received(e).is_some_and(|t| t >= from))
        .map(|e| {
            format!(
                "{} ({})",
                request(&e),
                e["user"]["username"].as_str().unwrap_or_default()
            )
        })
        .collect()
}

/// When the API server received the request of an audit event.
pub fn received(e: &Value) -> Option<jiff::Timestamp> {
    e["requestReceivedTimestamp"].as_str()?.parse().ok()
}

/// `verb resource[/subresource] namespace/name` of an audit event.
pub fn request(e: &Value) -> String {
    let o = &e["objectRef"];
    format!(
        "{} {}{} {}/{}",
        e["verb"].as_str().unwrap_or_default(),
        o["resource"].as_str().unwrap_or_default(),
        o["subresource"]
            .as_str()
            .map(|s| format!("/{s}"))
            .unwrap_or_default(),
        o["namespace"].as_str().unwrap_or_default(),
        o["name"].as_str().unwrap_or_default()
    )
}
