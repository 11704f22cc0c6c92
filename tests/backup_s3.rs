//! Off-site backups with the real restic (Debian) against a real S3-compatible server started here
//! (moto's, from PyPI through scripts/install-moto.sh, on 127.0.0.1): the repository is created once and
//! encrypted (no mail text reaches the bucket), backups are kept by count and by age, and one mailbox or
//! the whole mail root comes back byte for byte.
//!
//! Without restic or moto these tests skip with a message, except when `CI` is set: then they fail.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailpod_operator::backup::restic::{Repository, Retention};

const BUCKET: &str = "mail-backups";
const HOST: &str = "corp-lun-0";
const MARKER: &str = "Subject: quarterly figures 7f3a9c";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn skip(why: &str) -> bool {
    assert!(
        std::env::var_os("CI").is_none(),
        "required in CI (CI is set): {why}"
    );
    eprintln!("SKIPPED: {why}; set CI=1 to make this fail");
    true
}

/// moto's S3 server on a free loopback port, killed (by its PID) on drop.
struct S3Server {
    child: Child,
    port: u16,
}

impl S3Server {
    fn start() -> Option<Self> {
        if !Command::new("restic")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            skip("restic is not installed (Debian package `restic`, tests/packages.txt)");
            return None;
        }
        let installed = Command::new("bash")
            .arg(root().join("scripts/install-moto.sh"))
            .output()
            .expect("run scripts/install-moto.sh");
        if !installed.status.success() {
            skip(&format!(
                "scripts/install-moto.sh failed: {}",
                String::from_utf8_lossy(&installed.stderr).trim()
            ));
            return None;
        }
        let server = PathBuf::from(String::from_utf8_lossy(&installed.stdout).trim());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(server)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let s = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(s)
    }

    fn repository(&self, dir: &Path, prefix: &str, password: &str) -> Repository {
        let password_file = dir.join(format!("{prefix}.password"));
        std::fs::write(&password_file, password).unwrap();
        Repository {
            url: format!("s3:http://127.0.0.1:{}/{BUCKET}/{prefix}", self.port),
            password_file,
            env: [
                ("AWS_ACCESS_KEY_ID", "test"),
                ("AWS_SECRET_ACCESS_KEY", "test"),
                ("AWS_DEFAULT_REGION", "us-east-1"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into(),
            cache_dir: Some(dir.join("cache")),
        }
    }

    /// A plain GET on the S3 API (moto serves unsigned requests): the bucket's listing, an object.
    fn get(&self, path: &str) -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let body = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        out.split_off(body)
    }

    /// Every object key in the bucket.
    fn keys(&self) -> Vec<String> {
        let listing =
            String::from_utf8(self.get(&format!("/{BUCKET}?list-type=2&max-keys=1000"))).unwrap();
        listing
            .split("<Key>")
            .skip(1)
            .map(|k| k.split("</Key>").next().unwrap().to_string())
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A store's mail root: `<domain>/<user>/Maildir` with a message or two each.
fn mail_root(dir: &Path) -> PathBuf {
    let root = dir.join("mail");
    for (mailbox, name, text) in [
        (
            "example.com/alice",
            "1700000000.M1.store:2,S",
            format!("{MARKER}\r\n\r\nalice's mail\r\n"),
        ),
        (
            "example.com/alice",
            "1700000001.M2.store:2,",
            "Subject: lunch\r\n\r\nat noon\r\n".into(),
        ),
        (
            "example.com/bob",
            "1700000002.M3.store:2,",
            "Subject: hello\r\n\r\nbob's mail\r\n".into(),
        ),
    ] {
        let cur = root.join(mailbox).join("Maildir/cur");
        std::fs::create_dir_all(&cur).unwrap();
        std::fs::write(cur.join(name), text).unwrap();
    }
    root
}

/// Relative path -> content of every file under `dir`.
fn files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(e.path()).unwrap());
            }
        }
    }
    out
}

fn days_ago(days: i64) -> jiff::Timestamp {
    jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24 * days)
}

#[test]
fn encrypted_backups_kept_by_count_and_age_restore_one_mailbox_or_all() {
    let Some(s3) = S3Server::start() else { return };
    let work = tempfile::tempdir().unwrap();
    // restic creates the bucket with the repository if it is missing.
    let repo = s3.repository(work.path(), HOST, "correct horse battery staple");
    let mail = mail_root(work.path());

    assert!(repo.init_if_missing().unwrap(), "created");
    assert!(!repo.init_if_missing().unwrap(), "found, not created again");

    // Three backups, as three snapshots of the LUN taken 10 days, 5 days and 0 days ago.
    let mut ids = Vec::new();
    for (days, snapshot) in [
        (10, "corp-lun-0-a"),
        (5, "corp-lun-0-b"),
        (0, "corp-lun-0-c"),
    ] {
        let tags = [format!("snapshot={snapshot}")];
        ids.push(
            repo.backup(&mail, HOST, &tags, Some(days_ago(days)))
                .unwrap(),
        );
    }
    let backups = repo.backups(HOST).unwrap();
    assert_eq!(backups.len(), 3, "{backups:?}");
    assert!(backups[0]
        .tags()
        .contains(&"snapshot=corp-lun-0-a".to_string()));
    assert!(backups.iter().all(|b| b.hostname == HOST));

    // Encrypted: no object in the bucket holds the mail's text.
    let keys = s3.keys();
    assert!(
        keys.iter().any(|k| k.starts_with(&format!("{HOST}/data/"))),
        "{keys:?}"
    );
    for k in &keys {
        let body = s3.get(&format!("/{BUCKET}/{k}"));
        assert!(
            !body.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "{k} holds mail in clear"
        );
    }
    let wrong = s3.repository(work.path(), "wrong", "not the password");
    let wrong = Repository {
        url: repo.url.clone(),
        ..wrong
    };
    let err = wrong.backups(HOST).unwrap_err().to_string();
    assert!(err.contains("wrong password"), "{err}");
    let err = wrong.init_if_missing().unwrap_err().to_string();
    assert!(
        err.contains("wrong password"),
        "a wrong password never re-initialises: {err}"
    );

    // Age: keep what is within 7 days of the newest backup (and the newest), drop the 10-day-old one.
    let week = Retention {
        keep_last: 1,
        keep_within: Some("7d".into()),
    };
    let removed = repo.forget(HOST, &week).unwrap();
    let kept: Vec<String> = repo
        .backups(HOST)
        .unwrap()
        .into_iter()
        .map(|b| b.short_id)
        .collect();
    assert_eq!(
        kept,
        [ids[1].clone(), ids[2].clone()],
        "removed {removed:?}"
    );
    assert_eq!(removed.len(), 1);
    // Count: the newest only.
    let last = Retention {
        keep_last: 1,
        keep_within: None,
    };
    assert_eq!(repo.forget(HOST, &last).unwrap().len(), 1);
    let kept = repo.backups(HOST).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].short_id, ids[2]);

    // One mailbox comes back alone; the whole root comes back equal.
    let one = work.path().join("restore-alice");
    repo.restore(&kept[0].id, &one, Some("alice@example.com"))
        .unwrap();
    let got = files(&one);
    let want: std::collections::BTreeMap<_, _> = files(&mail)
        .into_iter()
        .filter(|(p, _)| p.starts_with("example.com/alice/"))
        .collect();
    assert_eq!(got, want);
    let all = work.path().join("restore-all");
    repo.restore(&kept[0].id, &all, None).unwrap();
    assert_eq!(files(&all), files(&mail));
    let err = repo
        .restore(&kept[0].id, &all, Some("not-an-address"))
        .unwrap_err();
    assert!(err.to_string().contains("not a mail address"), "{err}");
}
