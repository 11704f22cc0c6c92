//! Kubernetes conditions for the data-plane tests, so that they cannot hide what a pod changes:
//!
//! - [`ClusterDns`]: a resolver configured like a pod's. dnsmasq (Debian's) answers on a loopback address
//!   of its own, port 53, for the Services of the test's namespace under `svc.cluster.local` and nothing
//!   else (every other name is NXDOMAIN, like a name no cluster DNS knows); the daemons see a resolv.conf
//!   with the pod's search list and `options ndots:5`.
//! - [`pod_command`]: the agent in a private mount namespace (`unshare -m`) where that resolv.conf and a
//!   pod's /etc/hosts are bind-mounted over the machine's (Postfix and Dovecot read /etc/resolv.conf
//!   themselves), with the capabilities the rendered securityContext keeps and `no_new_privs`
//!   (`allowPrivilegeEscalation: false`).
//! - [`KubeletVolume`]: Secret and ConfigMap files laid out and owned as the kubelet's atomic writer lays
//!   them out: a `..<timestamp>` directory holding the files with the volume's `defaultMode`, a `..data`
//!   symlink to it, a symlink per key, root-owned; an update swaps `..data` atomically.
//!
//! Everything listens on 127.0.0.0/8 only. Processes are stopped by PID.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mailpod_operator::resources::pod::mail_security_context;
use mailpod_operator::resources::{service_host, DEFAULT_CLUSTER_DOMAIN};

/// Namespace of the test MailPods.
pub const NAMESPACE: &str = "mail";

/// The fully qualified name of Service `service` in the test namespace, as cluster DNS serves it.
pub fn cluster_name(service: &str) -> String {
    service_host(service, Some(NAMESPACE), DEFAULT_CLUSTER_DOMAIN)
}

/// The search list of a pod in [`NAMESPACE`].
pub fn pod_search_list() -> String {
    format!("{NAMESPACE}.svc.{DEFAULT_CLUSTER_DOMAIN} svc.{DEFAULT_CLUSTER_DOMAIN} {DEFAULT_CLUSTER_DOMAIN}")
}

/// Programs the pod conditions need besides the mail software; a test is skipped without them.
pub fn missing_tools() -> Vec<&'static str> {
    ["/usr/sbin/dnsmasq", "/usr/bin/unshare", "/usr/bin/setpriv"]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect()
}

/// dnsmasq answering for the test's Services; SIGTERM by PID on drop.
pub struct ClusterDns {
    pub addr: Ipv4Addr,
    dir: PathBuf,
    records: Mutex<BTreeMap<String, Ipv4Addr>>,
    child: Mutex<Option<Child>>,
}

impl ClusterDns {
    /// Starts dnsmasq on a free loopback address (127.X.Y.53, port 53), files under `dir`.
    pub fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "").unwrap();
        for attempt in 0..20u32 {
            let seed = std::process::id()
                .wrapping_mul(2_654_435_761)
                .wrapping_add(attempt * 7919)
                ^ (Instant::now().elapsed().as_nanos() as u32);
            let addr = Ipv4Addr::new(
                127,
                10 + (seed % 200) as u8,
                ((seed >> 8) % 250) as u8 + 1,
                53,
            );
            // Port 53 on this address must be free (a parallel test may hold it).
            if UdpSocket::bind(SocketAddrV4::new(addr, 53)).is_err() {
                continue;
            }
            let child = Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                ])
                .arg(format!("--addn-hosts={}", hosts.display()))
                .arg(format!("--listen-address={addr}"))
                .args([
                    "--bind-interfaces",
                    "--port=53",
                    "--user=root",
                    "--pid-file=",
                ])
                // Authoritative NXDOMAIN for every name it does not hold: nothing is asked upstream.
                .arg(format!("--local=/{DEFAULT_CLUSTER_DOMAIN}/"))
                .arg("--local=/#/")
                .arg("--log-queries")
                .arg(format!(
                    "--log-facility={}",
                    dir.join("dnsmasq.log").display()
                ))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting dnsmasq");
            let dns = Self {
                addr,
                dir: dir.to_path_buf(),
                records: Mutex::new(BTreeMap::new()),
                child: Mutex::new(Some(child)),
            };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if dns.query("ready.invalid").is_some() {
                    return dns;
                }
                if dns.exited() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(dns);
        }
        panic!(
            "dnsmasq did not start on any loopback address; see {}",
            dir.display()
        );
    }

    fn exited(&self) -> bool {
        let mut c = self.child.lock().unwrap();
        matches!(c.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))))
    }

    /// The resolv.conf of a pod in [`NAMESPACE`] using this server (written under the server's directory).
    pub fn resolv_conf(&self) -> PathBuf {
        let path = self.dir.join("resolv.conf");
        std::fs::write(
            &path,
            format!(
                "search {}\nnameserver {}\noptions ndots:5\n",
                pod_search_list(),
                self.addr
            ),
        )
        .unwrap();
        path
    }

    /// Points `name` (fully qualified) at `addr`, as a Service's endpoints would, and waits until it answers.
    pub fn set(&self, name: &str, addr: Ipv4Addr) {
        let text = {
            let mut r = self.records.lock().unwrap();
            r.insert(name.to_string(), addr);
            r.iter()
                .map(|(n, a)| format!("{a} {n}\n"))
                .collect::<String>()
        };
        let hosts = self.dir.join("hosts");
        let tmp = self.dir.join("hosts.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &hosts).unwrap();
        let pid = self.child.lock().unwrap().as_ref().unwrap().id();
        let _ = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status();
        let start = Instant::now();
        while self.query(name) != Some(Some(addr)) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "dnsmasq does not answer {name} -> {addr}; see {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks the server for `name`'s A record: `None` without an answer, `Some(None)` for NXDOMAIN or no
    /// address.
    pub fn query(&self, name: &str) -> Option<Option<Ipv4Addr>> {
        let s = UdpSocket::bind("127.0.0.1:0").ok()?;
        s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        let mut q = vec![0x4d, 0x50, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.trim_end_matches('.').split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        s.send_to(&q, SocketAddrV4::new(self.addr, 53)).ok()?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).ok()?;
        let r = &buf[..n];
        if n < 12 || r[0..2] != [0x4d, 0x50] {
            return None;
        }
        let answers = u16::from_be_bytes([r[6], r[7]]);
        if r[3] & 0x0f != 0 || answers == 0 {
            return Some(None);
        }
        // The answer's record follows the question; its address is the last four bytes of the first A record.
        let mut i = q.len();
        for _ in 0..answers {
            // Name: a pointer (2 bytes) or labels.
            if r.get(i)? & 0xc0 == 0xc0 {
                i += 2;
            } else {
                while *r.get(i)? != 0 {
                    i += 1 + r[i] as usize;
                }
                i += 1;
            }
            let rtype = u16::from_be_bytes([*r.get(i)?, *r.get(i + 1)?]);
            let len = u16::from_be_bytes([*r.get(i + 8)?, *r.get(i + 9)?]) as usize;
            i += 10;
            if rtype == 1 && len == 4 {
                return Some(Some(Ipv4Addr::new(r[i], r[i + 1], r[i + 2], r[i + 3])));
            }
            i += len;
        }
        Some(None)
    }

    /// The names the daemons asked for, from dnsmasq's query log.
    pub fn queries(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("dnsmasq.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                l.split_once(" query[A] ")
                    .map(|(_, q)| q.split(' ').next().unwrap_or("").to_string())
            })
            .collect()
    }
}

impl Drop for ClusterDns {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A pod's /etc/hosts: only localhost and the pod's own name.
pub fn pod_hosts_file(dir: &Path, pod: &str, addr: &str) -> PathBuf {
    let path = dir.join(format!("{pod}.hosts"));
    std::fs::write(
        &path,
        format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{addr}\t{pod}\n"),
    )
    .unwrap();
    path
}

/// The capabilities a mail container keeps (the rendered securityContext's `add`, after `drop: [ALL]`),
/// as setpriv's `--bounding-set` argument.
pub fn rendered_bounding_set() -> String {
    let sc = mail_security_context();
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let mut arg = "-all".to_string();
    for c in caps.add.unwrap_or_default() {
        arg.push_str(&format!(",+{}", c.to_ascii_lowercase()));
    }
    arg
}

/// `program args...` run as a mail container would be: in a private mount namespace with the pod's
/// resolv.conf and /etc/hosts bind-mounted, with only the rendered capabilities and `no_new_privs`.
pub fn pod_command(resolv_conf: &Path, hosts: &Path, program: &str) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount --bind \"$1\" /etc/resolv.conf && mount --bind \"$2\" /etc/hosts && shift 2 && exec \"$@\"",
        )
        .arg("sh")
        .arg(resolv_conf)
        .arg(hosts)
        .args(["setpriv", "--no-new-privs", "--inh-caps=-all"])
        .arg(format!("--bounding-set={}", rendered_bounding_set()))
        .arg("--")
        .arg(program);
    cmd
}

/// A Secret or ConfigMap volume as the kubelet writes it.
pub struct KubeletVolume {
    pub dir: PathBuf,
    /// The volume's `defaultMode` (Kubernetes' default: 0644).
    pub mode: u32,
}

impl KubeletVolume {
    /// An empty volume directory (a Secret's is a tmpfs: mode 1777).
    pub fn new(dir: PathBuf, mode: u32) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        Self { dir, mode }
    }

    /// Path of key `key` (the symlink the container opens).
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Publishes `files` like the kubelet's atomic writer: a new `..<timestamp>` directory (0755) with the
    /// files at `mode`, root-owned; a `..data_tmp` symlink renamed over `..data`; a symlink per key into
    /// `..data`; keys no longer present and the previous directory removed.
    pub fn publish(&self, files: &BTreeMap<String, Vec<u8>>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let stamp = format!("..{}_{:09}", now.as_secs(), now.subsec_nanos());
        let ts = self.dir.join(&stamp);
        std::fs::create_dir(&ts).unwrap();
        std::fs::set_permissions(&ts, std::fs::Permissions::from_mode(0o755)).unwrap();
        for (k, v) in files {
            let f = ts.join(k);
            std::fs::write(&f, v).unwrap();
            std::os::unix::fs::chown(&f, Some(0), Some(0)).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(self.mode)).unwrap();
        }
        let old = std::fs::read_link(self.dir.join("..data")).ok();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&stamp, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        for k in files.keys() {
            let link = self.dir.join(k);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(k), &link).unwrap();
            }
        }
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && !files.contains_key(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(self.dir.join(old));
        }
    }
}
