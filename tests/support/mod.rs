//! Helpers for the data-plane tests: a MailPod's mounted ConfigMaps and users Secret in a temp dir, laid
//! out as the kubelet lays them out; agent processes on 127.0.0.1 high ports (killed on drop) under a pod's
//! conditions ([`pod`]: cluster DNS with the pod's search list, the rendered capabilities); and tiny
//! SMTP/IMAP/POP3 clients over plain TcpStreams, connecting from 127.0.0.2, an address that is not the
//! servers' own.
#![allow(dead_code)]

pub mod dkimpy;
pub mod downstream;
pub mod filter;
pub mod pod;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailpod_operator::mailconfig::settings::MailSettings;
use mailpod_operator::mailconfig::tables::{AccessTables, LunEndpoint};
use pod::{ClusterDns, KubeletVolume};

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// True when Debian's Postfix and Dovecot are installed; otherwise prints why the test is skipped.
pub fn mail_software_present(test: &str) -> bool {
    let missing: Vec<&str> = [
        "/usr/sbin/postfix",
        "/usr/sbin/postmap",
        "/usr/sbin/dovecot",
        "/usr/bin/doveadm",
    ]
    .into_iter()
    .filter(|p| !Path::new(p).exists())
    .collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIPPED {test}: mail software not installed ({}); install mail-image/packages.txt to run it",
            missing.join(", ")
        );
        return false;
    }
    // A test never runs without the pod conditions. Without their tools it skips with a message, and in CI
    // (`CI` set, as .ci/run does) it fails, like every test that needs a tool.
    let tools = pod::missing_tools();
    if tools.is_empty() {
        return true;
    }
    let why = format!(
        "{test}: the pod conditions need {} (apt-get install -y dnsmasq util-linux)",
        tools.join(", ")
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("SKIPPED {why}");
    false
}

/// A port no server of this test process has been given, free on 127.0.0.1 when asked.
///
/// Taken below the kernel's ephemeral range (32768-60999 by default): a port the kernel hands out for
/// `bind(0)` is released before the server binds it, and in between any outgoing connection on the
/// machine (Postfix's LMTP client, doveadm) may take it, or the next `bind(0)` may return it again.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let mut x = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
    for _ in 0..SPAN {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let port = (LOW + (x >> 8) % SPAN) as u16;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 between {LOW} and {}", LOW + SPAN);
}

/// Polls `f` until it returns Some, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The mounted ConfigMaps of one MailPod and the users Secret, as the kubelet would present them, and the
/// cluster DNS its pods resolve names with.
pub struct Site {
    pub root: tempfile::TempDir,
    pub settings: MailSettings,
    pub tables: AccessTables,
    pub dns: ClusterDns,
    /// The users Secret volume (mode as rendered, root-owned) and the passwd-file lines in it.
    pub users: KubeletVolume,
    users_text: String,
}

/// Key of the users passwd-file in the test's users Secret.
pub const USERS_KEY: &str = "users";

/// The `defaultMode` the builders render for Secret volumes.
pub fn rendered_secret_mode() -> u32 {
    mailpod_operator::resources::pod::secret_volume("v", "s")
        .secret
        .unwrap()
        .default_mode
        .unwrap() as u32
}

impl Site {
    pub fn new(max_message_bytes: u64) -> Self {
        let root = tempfile::tempdir().unwrap();
        // Postfix and Dovecot drop privileges; they must be able to reach their files below the temp dir.
        Command::new("chmod")
            .arg("755")
            .arg(root.path())
            .status()
            .unwrap();
        let settings = MailSettings {
            mailpod: "corp".into(),
            hostname: "mail.example.com".into(),
            max_message_bytes,
            connection_rate_limit: 0,
            dnsbl: vec![],
            dnsbl_threshold: 1,
            tls: false,
            features: Default::default(),
            filter: None,
            signer: None,
        };
        let dns = ClusterDns::start(&root.path().join("dns"));
        let users = KubeletVolume::new(root.path().join("users-secret"), rendered_secret_mode());
        let site = Self {
            root,
            settings,
            tables: AccessTables::default(),
            dns,
            users,
            users_text: String::new(),
        };
        site.users.publish(&Default::default());
        std::fs::create_dir_all(site.config_dir()).unwrap();
        std::fs::create_dir_all(site.tables_dir()).unwrap();
        std::fs::write(
            site.config_dir().join("settings.yaml"),
            site.settings.to_yaml(),
        )
        .unwrap();
        site
    }

    pub fn config_dir(&self) -> PathBuf {
        self.root.path().join("settings")
    }
    pub fn tables_dir(&self) -> PathBuf {
        self.root.path().join("tables")
    }
    /// The users passwd-file as the container sees it (a symlink into the Secret volume's `..data`).
    pub fn users_file(&self) -> PathBuf {
        self.users.path(USERS_KEY)
    }

    /// Replaces the users Secret's passwd-file, as the kubelet updates a mounted Secret.
    pub fn set_users(&mut self, text: &str) {
        self.users_text = text.to_string();
        self.users.publish(&std::collections::BTreeMap::from([(
            USERS_KEY.to_string(),
            text.as_bytes().to_vec(),
        )]));
    }

    /// Adds a LUN answering on the given store ports, by the fully qualified name of its Service (which
    /// cluster DNS points at 127.0.0.1).
    pub fn lun(&mut self, index: u32, store: &Ports) {
        let host = pod::cluster_name(&mailpod_operator::names::lun(&self.settings.mailpod, index));
        self.dns.set(&host, std::net::Ipv4Addr::LOCALHOST);
        self.tables.luns.insert(
            index,
            LunEndpoint {
                host,
                lmtp_port: store.lmtp,
                imap_port: store.imap,
                pop3_port: store.pop3,
                sieve_port: store.sieve,
            },
        );
    }

    /// Adds a mailbox on a LUN with a plain-text password in the users Secret.
    pub fn mailbox(&mut self, address: &str, lun: u32, password: &str) {
        if !self
            .tables
            .domains
            .iter()
            .any(|d| address.ends_with(&format!("@{d}")))
        {
            self.tables
                .domains
                .push(address.split('@').nth(1).unwrap().to_string());
            self.tables.domains.sort();
        }
        self.tables.mailboxes.insert(address.into(), lun);
        let users = format!("{}{address}:{{PLAIN}}{password}\n", self.users_text);
        self.set_users(&users);
    }

    /// Publishes the tables like the kubelet: a new timestamped directory, then an atomic symlink swap.
    pub fn publish(&self) {
        let dir = self.tables_dir();
        let stamp = format!("..{}", Instant::now().elapsed().as_nanos() + rand_suffix());
        let new = dir.join(&stamp);
        std::fs::create_dir(&new).unwrap();
        for (k, v) in self.tables.to_data() {
            std::fs::write(new.join(&k), v).unwrap();
            let link = dir.join(&k);
            if !link.exists() {
                std::os::unix::fs::symlink(Path::new("..data").join(&k), &link).unwrap();
            }
        }
        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&stamp, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The control token every test agent is started with.
pub const CONTROL_TOKEN: &str = "test-control-token";

#[derive(Clone, Debug)]
pub struct Ports {
    pub smtp: u16,
    pub submission: u16,
    pub submissions: u16,
    pub imap: u16,
    pub imaps: u16,
    pub pop3: u16,
    pub pop3s: u16,
    pub lmtp: u16,
    pub http: u16,
    pub control: u16,
    pub doveadm: u16,
    /// doveadm's TLS listener (served only with a site replication certificate).
    pub doveadm_tls: u16,
    pub sieve: u16,
}

impl Ports {
    pub fn free() -> Self {
        Self {
            smtp: free_port(),
            submission: free_port(),
            submissions: free_port(),
            imap: free_port(),
            imaps: free_port(),
            pop3: free_port(),
            pop3s: free_port(),
            lmtp: free_port(),
            http: free_port(),
            control: free_port(),
            doveadm: free_port(),
            doveadm_tls: free_port(),
            sieve: free_port(),
        }
    }
}

/// One `mailpod-operator agent` process; SIGTERM then SIGKILL on drop.
pub struct Agent {
    pub role: &'static str,
    pub ports: Ports,
    pub work: PathBuf,
    child: Option<Child>,
}

impl Agent {
    pub fn start(site: &Site, role: &'static str, name: &str, ports: &Ports) -> Self {
        Self::start_with(site, role, name, ports, &[])
    }

    /// [`Agent::start`] with extra command-line arguments.
    pub fn start_with(
        site: &Site,
        role: &'static str,
        name: &str,
        ports: &Ports,
        extra: &[String],
    ) -> Self {
        let users = [
            "--users-file".to_string(),
            site.users_file().display().to_string(),
        ];
        Self::spawn(site, role, name, ports, &[extra, &users[..]].concat(), &[])
    }

    /// A store replica of LUN `corp-lun-0`: the LUN's active doveadm at `lun` (host, port: where the LUN
    /// Service would route), the shared doveadm password file, its role from `labels` (and its replication
    /// source from `annotations` when given), a pass every second.
    pub fn start_replica(
        site: &Site,
        name: &str,
        own: &Ports,
        lun: (&str, u16),
        password: &Path,
        labels: &Path,
        annotations: Option<&Path>,
    ) -> Self {
        Self::start_replica_with(site, name, own, lun, password, labels, annotations, &[])
    }

    /// [`Agent::start_replica`] with `more` arguments (a site replication certificate, say).
    #[allow(clippy::too_many_arguments)]
    pub fn start_replica_with(
        site: &Site,
        name: &str,
        own: &Ports,
        lun: (&str, u16),
        password: &Path,
        labels: &Path,
        annotations: Option<&Path>,
        more: &[String],
    ) -> Self {
        let mut extra: Vec<String> = [
            "--lun",
            "corp-lun-0",
            "--lun-host",
            lun.0,
            "--lun-doveadm-port",
            &lun.1.to_string(),
            "--doveadm-password-file",
            password.to_str().unwrap(),
            "--labels-file",
            labels.to_str().unwrap(),
            "--sync-interval-seconds",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(a) = annotations {
            extra.extend(["--annotations-file".to_string(), a.display().to_string()]);
        }
        extra.extend(more.iter().cloned());
        Self::start_with(site, "store", name, own, &extra)
    }

    /// An agent told only what the rendered container tells it: `env` (the container's variables, paths
    /// already mapped to the test's volumes) and `extra` arguments; no `--users-file` of the harness.
    pub fn start_with_env(
        site: &Site,
        role: &'static str,
        name: &str,
        ports: &Ports,
        extra: &[String],
        env: &[(String, String)],
    ) -> Self {
        Self::spawn(site, role, name, ports, extra, env)
    }

    fn spawn(
        site: &Site,
        role: &'static str,
        name: &str,
        ports: &Ports,
        extra: &[String],
        env: &[(String, String)],
    ) -> Self {
        let work = site.root.path().join(name);
        let log =
            std::fs::File::create(site.root.path().join(format!("{name}.agent.log"))).unwrap();
        let hosts = pod::pod_hosts_file(site.root.path(), name, "127.0.0.1");
        // The LUN's control token, as the store pods get it from their `<lun>-control` Secret.
        let control_token = site.root.path().join(format!("{name}.control-token"));
        std::fs::write(&control_token, CONTROL_TOKEN).unwrap();
        let child = pod::pod_command(
            &site.dns.resolv_conf(),
            &hosts,
            env!("CARGO_BIN_EXE_mailpod-operator"),
        )
        .args(["agent", "--role", role, "--listen", "127.0.0.1"])
        .arg("--config-dir")
        .arg(site.config_dir())
        .arg("--tables-dir")
        .arg(site.tables_dir())
        .arg("--work-dir")
        .arg(&work)
        .args(["--listen-metrics", &format!("127.0.0.1:{}", ports.http)])
        .args(["--listen-control", &format!("127.0.0.1:{}", ports.control)])
        .arg("--control-token-file")
        .arg(&control_token)
        .args(["--smtp-port", &ports.smtp.to_string()])
        .args(["--submission-port", &ports.submission.to_string()])
        .args(["--imap-port", &ports.imap.to_string()])
        .args(["--pop3-port", &ports.pop3.to_string()])
        .args(["--submissions-port", &ports.submissions.to_string()])
        .args(["--imaps-port", &ports.imaps.to_string()])
        .args(["--pop3s-port", &ports.pop3s.to_string()])
        .args(["--lmtp-port", &ports.lmtp.to_string()])
        .args(["--doveadm-port", &ports.doveadm.to_string()])
        .args(["--doveadm-tls-port", &ports.doveadm_tls.to_string()])
        .args(["--sieve-port", &ports.sieve.to_string()])
        .args(["--poll-ms", "200", "--grace-seconds", "5"])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawning the agent");
        let mut agent = Self {
            role,
            ports: ports.clone(),
            work,
            child: Some(child),
        };
        agent.wait_ready();
        agent
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn wait_ready(&mut self) {
        let port = self.ports.http;
        let role = self.role;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{role} agent exited during start-up with {status}; see its log in {}",
                    self.work.display()
                );
            }
            if let Ok((200, _)) = http(port, "GET", "/readyz") {
                return;
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "{role} agent not ready within 30 s: {:?}",
                    http(port, "GET", "/readyz")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.ports.http, "GET", path).unwrap()
    }

    /// A control request with the LUN's control token, as the snapshot jobs send it.
    pub fn post(&self, path: &str) -> (u16, String) {
        self.post_as(path, Some(CONTROL_TOKEN))
    }

    /// A control request with `token` as its bearer token, or with no `Authorization` header.
    pub fn post_as(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let header = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        http_with(self.ports.control, "POST", path, &header).unwrap()
    }

    /// Value of a metric line `name{labels} value` from /metrics.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
    }

    /// SIGTERM, wait for an orderly exit (bounded), return whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Postfix's queue directory (mx, submission).
    pub fn queue(&self) -> PathBuf {
        self.work.join("spool")
    }

    /// `postqueue -f`: retry deferred mail now.
    pub fn flush_queue(&self) {
        let st = Command::new("postqueue")
            .arg("-c")
            .arg(self.work.join("postfix"))
            .arg("-f")
            .status()
            .unwrap();
        assert!(st.success(), "postqueue -f failed");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The address test clients connect from.
pub const CLIENT_ADDRESS: &str = "127.0.0.2";

/// A TCP connection to 127.0.0.1:`port` from [`CLIENT_ADDRESS`].
pub fn connect_from_client_address(port: u16) -> TcpStream {
    use socket2::{Domain, SockAddr, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SockAddr::from(
        format!("{CLIENT_ADDRESS}:0")
            .parse::<std::net::SocketAddr>()
            .unwrap(),
    ))
    .unwrap();
    s.connect_timeout(
        &SockAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
        IO_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("connecting to 127.0.0.1:{port}: {e}"));
    s.into()
}

/// Minimal HTTP/1.1 request; returns status and body.
pub fn http(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_with(port, method, path, "")
}

/// `http` with extra header lines (each ending in CRLF).
pub fn http_with(
    port: u16,
    method: &str,
    path: &str,
    headers: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A line-oriented client session (SMTP, IMAP, POP3 all fit).
pub struct Session {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Session {
    /// Connects to 127.0.0.1:`port` from 127.0.0.2: a server must not see its clients on its own address
    /// (Dovecot treats such a client as secured, as if it were local).
    pub fn connect(port: u16) -> Self {
        Self::from_stream(connect_from_client_address(port))
    }

    pub fn from_stream(s: TcpStream) -> Self {
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        Self {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    /// The connection, for a TLS upgrade after STARTTLS (nothing is buffered: the server waits for the
    /// client's handshake).
    pub fn into_stream(self) -> TcpStream {
        assert!(self.r.buffer().is_empty(), "bytes pending before TLS");
        self.w
    }

    /// The next line, or the error (a closed connection reads as an empty line).
    pub fn try_line(&mut self) -> std::io::Result<String> {
        let mut l = String::new();
        self.r.read_line(&mut l)?;
        Ok(l)
    }

    /// Sends `text`; the error when the server has closed the connection.
    pub fn try_send(&mut self, text: &str) -> std::io::Result<()> {
        self.w.write_all(text.as_bytes())
    }

    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("reading a reply");
        l
    }

    pub fn send(&mut self, text: &str) {
        self.w.write_all(text.as_bytes()).unwrap();
    }

    /// Reads an SMTP reply (all continuation lines); returns code and full text.
    pub fn smtp_reply(&mut self) -> (u16, String) {
        let mut all = String::new();
        loop {
            let l = self.line();
            assert!(l.len() >= 4, "short SMTP reply {l:?} after {all:?}");
            all.push_str(&l);
            if l.as_bytes()[3] == b' ' {
                return (l[..3].parse().unwrap(), all);
            }
        }
    }

    pub fn smtp(&mut self, command: &str) -> (u16, String) {
        self.send(&format!("{command}\r\n"));
        self.smtp_reply()
    }

    /// Sends an IMAP command with tag `t`, returns the untagged lines and the tagged status line.
    pub fn imap(&mut self, command: &str) -> (Vec<String>, String) {
        self.send(&format!("t {command}\r\n"));
        let mut lines = Vec::new();
        loop {
            let l = self.line();
            assert!(!l.is_empty(), "IMAP connection closed after {lines:?}");
            if l.starts_with("t ") {
                return (lines, l);
            }
            lines.push(l);
        }
    }
}

/// Sends one message over SMTP; returns the first non-2xx/3xx reply or the final 250.
pub fn send_mail(
    port: u16,
    from: &str,
    to: &[&str],
    subject: &str,
    body_bytes: usize,
) -> (u16, String) {
    let mut s = Session::connect(port);
    let (code, text) = s.smtp_reply();
    assert_eq!(code, 220, "banner: {text}");
    let (code, text) = s.smtp("EHLO client.test");
    assert_eq!(code, 250, "{text}");
    for (command, want) in std::iter::once((format!("MAIL FROM:<{from}>"), 250))
        .chain(to.iter().map(|r| (format!("RCPT TO:<{r}>"), 250)))
        .chain(std::iter::once(("DATA".to_string(), 354)))
    {
        let (code, text) = s.smtp(&command);
        if code != want {
            return (code, text);
        }
    }
    s.send(&message(from, to, subject, body_bytes));
    let reply = s.smtp(".");
    let _ = s.smtp("QUIT");
    reply
}

pub fn message(from: &str, to: &[&str], subject: &str, body_bytes: usize) -> String {
    let mut m = format!(
        "From: <{from}>\r\nTo: {}\r\nSubject: {subject}\r\n\r\n",
        to.join(", ")
    );
    let line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    let mut n = 0;
    while n < body_bytes {
        m.push_str(line);
        n += line.len();
    }
    m.push_str("end\r\n");
    m
}

/// Subjects of every message in a mailbox's Maildir on a store (new and cur), with repetitions.
pub fn maildir_subjects(store: &Agent, address: &str) -> Vec<String> {
    let (user, domain) = address.split_once('@').unwrap();
    let maildir = store
        .work
        .join("mail")
        .join(domain)
        .join(user)
        .join("Maildir");
    let mut subjects = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = std::fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for e in entries.flatten() {
            // Dovecot moves files from new/ to cur/ and removes expunged ones while we read: a file gone
            // since the listing is skipped (the caller polls again).
            let Ok(text) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            if let Some(s) = text.lines().find_map(|l| l.strip_prefix("Subject: ")) {
                subjects.push(s.trim().to_string());
            }
        }
    }
    subjects.sort();
    subjects
}

/// Delivers one message per subject over LMTP in one session (to a store's LMTP port); panics unless
/// every one is accepted.
pub fn deliver_lmtp(port: u16, to: &str, subjects: &[String]) {
    let mut s = Session::connect(port);
    let (code, text) = s.smtp_reply();
    assert_eq!(code, 220, "LMTP banner: {text}");
    let (code, text) = s.smtp("LHLO client.test");
    assert_eq!(code, 250, "{text}");
    for subject in subjects {
        for command in [
            "MAIL FROM:<x@remote.test>".to_string(),
            format!("RCPT TO:<{to}>"),
        ] {
            let (code, text) = s.smtp(&command);
            assert_eq!(code, 250, "{command}: {text}");
        }
        let (code, text) = s.smtp("DATA");
        assert_eq!(code, 354, "{text}");
        s.send(&message("x@remote.test", &[to], subject, 200));
        let (code, text) = s.smtp(".");
        assert_eq!(code, 250, "delivering {subject}: {text}");
    }
    let _ = s.smtp("QUIT");
}

pub fn unique(v: &[String]) -> BTreeSet<String> {
    v.iter().cloned().collect()
}

/// Waits until a store replica takes writes: it has read that it is its LUN's active and enforced it.
pub fn wait_accepts_writes(store: &Agent) {
    wait_for(
        &format!("{} to take writes", store.work.display()),
        Duration::from_secs(30),
        || {
            let (code, body) = store.get("/replication");
            (code == 200 && body.contains("\"acceptsWrites\":true")).then_some(())
        },
    );
}

/// Base64 (standard alphabet, padded), for SASL PLAIN.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A session on submission logged in as `user`.
pub fn logged_in(port: u16, user: &str, password: &str) -> Session {
    let mut s = Session::connect(port);
    assert_eq!(s.smtp_reply().0, 220);
    assert_eq!(s.smtp("EHLO client.test").0, 250);
    let (code, text) = s.smtp(&format!(
        "AUTH PLAIN {}",
        base64(format!("\0{user}\0{password}").as_bytes())
    ));
    assert_eq!(code, 235, "login as {user}: {text}");
    s
}
