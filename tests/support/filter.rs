//! The filter of the mx pod for data-plane tests and benchmarks: Debian's rspamd (the rendered
//! `override.d` files over its stock configuration), redis-server and clamd on 127.0.0.1 high ports under
//! the pod conditions; stopped by PID.
//!
//! No signature download is possible here: clamd gets a database of one custom signature
//! (`Mailpod.Test.Virus`, an `.ndb` body signature for [`TEST_VIRUS`]), as an offline signatures volume
//! would hold it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailpod_operator::crd::FilteringSpec;
use mailpod_operator::mailconfig::rspamd::{clamd_conf, rspamd_files, Endpoints};

use super::{free_port, mail_software_present, Site};

/// The string the test signature matches (hex in the `.ndb` line).
pub const TEST_VIRUS: &str = "MAILPOD-TEST-VIRUS-7c1e5a0d-NOT-A-REAL-VIRUS";
pub fn filter_software_present(test: &str) -> bool {
    if !mail_software_present(test) {
        return false;
    }
    let missing: Vec<&str> = [
        "/usr/bin/rspamd",
        "/usr/bin/redis-server",
        "/usr/sbin/clamd",
    ]
    .into_iter()
    .filter(|p| !Path::new(p).exists())
    .collect();
    if missing.is_empty() {
        return true;
    }
    let why = format!(
        "{test}: the filter needs {} (mail-image/packages.txt: rspamd, redis-server, clamav-daemon)",
        missing.join(", ")
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("SKIPPED {why}");
    false
}

/// One filter daemon under the pod conditions; SIGTERM by PID, then SIGKILL, on drop.
pub struct Daemon {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub fn start(site: &Site, name: &'static str, program: &str, args: &[String]) -> Self {
        let log = site.root.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let hosts = super::pod::pod_hosts_file(site.root.path(), name, "127.0.0.1");
        let child = super::pod::pod_command(&site.dns.resolv_conf(), &hosts, program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Self {
            name,
            child: Some(child),
            log,
        }
    }

    pub fn wait_listening(&mut self, port: u16, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited with {st}: {}", self.name, self.log_text());
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "{} not listening on {port} within {timeout:?}: {}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// rspamd, its Redis and clamd, configured by the operator's renderers for `spec`.
pub struct Filter {
    pub ep: Endpoints,
    pub milter_port: u16,
    confdir: PathBuf,
    dbdir: PathBuf,
    pub rspamd: Daemon,
    _redis: Daemon,
    _clamd: Daemon,
}

impl Filter {
    pub fn start(site: &Site, spec: &FilteringSpec) -> Self {
        Self::start_with(site, spec, |_| {})
    }

    /// `start`, with `tweak` applied to the rendered files first (what a test must state of itself).
    pub fn start_with(
        site: &Site,
        spec: &FilteringSpec,
        tweak: impl FnOnce(&mut std::collections::BTreeMap<String, String>),
    ) -> Self {
        let (milter_port, redis_port, clamd_port) = (free_port(), free_port(), free_port());
        let ep = Endpoints {
            milter: format!("127.0.0.1:{milter_port}"),
            redis: format!("127.0.0.1:{redis_port}"),
            clamd: format!("127.0.0.1:{clamd_port}"),
        };
        let root = site.root.path();
        let confdir = root.join("rspamd");
        std::fs::create_dir_all(confdir.join("override.d")).unwrap();
        let mut files = rspamd_files(spec, site.settings.max_message_bytes, &ep);
        tweak(&mut files);
        for (name, text) in files {
            std::fs::write(confdir.join("override.d").join(name), text).unwrap();
        }
        // Writable by the users the daemons drop to, as an emptyDir is.
        let dbdir = root.join("rspamd-db");
        let clamdb = root.join("clamav-db");
        for d in [&dbdir, &clamdb] {
            std::fs::create_dir_all(d).unwrap();
            Command::new("chmod").arg("1777").arg(d).status().unwrap();
        }
        std::fs::write(
            clamdb.join("mailpod-test.ndb"),
            format!(
                "Mailpod.Test.Virus:0:*:{}\n",
                TEST_VIRUS
                    .bytes()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
        )
        .unwrap();
        let clamd_file = root.join("clamd.conf");
        std::fs::write(
            &clamd_file,
            clamd_conf(
                site.settings.max_message_bytes,
                &ep.clamd,
                &clamdb.display().to_string(),
            ),
        )
        .unwrap();
        let mut redis = Daemon::start(
            site,
            "redis",
            "/usr/bin/redis-server",
            &[
                "--bind",
                "127.0.0.1",
                "--port",
                &redis_port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .map(String::from),
        );
        let mut clamd = Daemon::start(
            site,
            "clamd",
            "/usr/sbin/clamd",
            &[format!("--config-file={}", clamd_file.display())],
        );
        redis.wait_listening(redis_port, Duration::from_secs(20));
        clamd.wait_listening(clamd_port, Duration::from_secs(60));
        let rspamd = start_rspamd(site, &confdir, &dbdir, milter_port);
        Self {
            ep,
            milter_port,
            confdir,
            dbdir,
            rspamd,
            _redis: redis,
            _clamd: clamd,
        }
    }

    pub fn restart_rspamd(&mut self, site: &Site) {
        self.rspamd.stop();
        self.rspamd = start_rspamd(site, &self.confdir, &self.dbdir, self.milter_port);
    }
}

/// rspamd as the mx pod's container runs it: Debian's configuration, the rendered files as
/// LOCAL_CONFDIR/override.d, dropping to `_rspamd`.
fn start_rspamd(site: &Site, confdir: &Path, dbdir: &Path, milter_port: u16) -> Daemon {
    let args = mailpod_operator::resources::filter::rspamd_args(
        &confdir.display().to_string(),
        &dbdir.display().to_string(),
    );
    let mut d = Daemon::start(site, "rspamd", "/usr/bin/rspamd", &args);
    // rspamd compiles its rules at start-up; on two busy cores that takes a while.
    d.wait_listening(milter_port, Duration::from_secs(180));
    d
}

/// submission's DKIM signer: rspamd with the rendered signing-only files, the keys in a directory as the
/// Secret volume holds them (`<domain>.<selector>.key`, mode 0444).
pub struct Signer {
    pub milter: String,
    pub rspamd: Daemon,
}

impl Signer {
    pub fn start(site: &Site, selector: &str, keys: &[(&str, &str)]) -> Self {
        let port = free_port();
        let milter = format!("127.0.0.1:{port}");
        let root = site.root.path();
        let keydir = root.join("dkim");
        std::fs::create_dir_all(&keydir).unwrap();
        Command::new("chmod")
            .arg("755")
            .arg(&keydir)
            .status()
            .unwrap();
        for (domain, pem) in keys {
            let path = keydir.join(mailpod_operator::crd::dkim_key_name(domain, selector));
            std::fs::write(&path, pem).unwrap();
            Command::new("chmod")
                .arg("444")
                .arg(&path)
                .status()
                .unwrap();
        }
        let confdir = root.join("signer");
        std::fs::create_dir_all(confdir.join("override.d")).unwrap();
        for (name, text) in mailpod_operator::mailconfig::rspamd::signer_files(
            selector,
            &keydir.display().to_string(),
            &milter,
        ) {
            std::fs::write(confdir.join("override.d").join(name), text).unwrap();
        }
        let dbdir = root.join("signer-db");
        std::fs::create_dir_all(&dbdir).unwrap();
        Command::new("chmod")
            .arg("1777")
            .arg(&dbdir)
            .status()
            .unwrap();
        let rspamd = start_rspamd(site, &confdir, &dbdir, port);
        Self { milter, rspamd }
    }
}
