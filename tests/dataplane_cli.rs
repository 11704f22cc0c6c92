//! The agent refuses bad mounted input at start-up with an error naming the file and field, and exits.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run_agent(settings: &str, luns: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, tables) = (dir.path().join("settings"), dir.path().join("tables"));
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::create_dir_all(&tables).unwrap();
    std::fs::write(cfg.join("settings.yaml"), settings).unwrap();
    std::fs::write(tables.join("luns"), luns).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailpod-operator"))
        .args([
            "agent",
            "--role",
            "mx",
            "--listen",
            "127.0.0.1",
            "--listen-metrics",
            "127.0.0.1:0",
        ])
        .arg("--config-dir")
        .arg(&cfg)
        .arg("--tables-dir")
        .arg(&tables)
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("agent kept running on bad input");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    (status.success(), err)
}

const GOOD_SETTINGS: &str =
    "mailpod: corp\nhostname: mail.example.com\nmaxMessageBytes: 1000\nconnectionRateLimit: 0\ndnsblThreshold: 1\ntls: false\n";

#[test]
fn bad_table_line_is_named_and_agent_exits() {
    let (ok, err) = run_agent(GOOD_SETTINGS, "0 127.0.0.1 24 143\n");
    assert!(!ok);
    assert!(err.contains("key `luns` line 1"), "{err}");
}

#[test]
fn bad_settings_field_is_named_and_agent_exits() {
    let (ok, err) = run_agent(
        &GOOD_SETTINGS.replace("maxMessageBytes: 1000", "maxMessageBytes: 0"),
        "",
    );
    assert!(!ok);
    assert!(
        err.contains("settings.yaml") && err.contains("maxMessageBytes"),
        "{err}"
    );
}

#[test]
fn unknown_role_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_mailpod-operator"))
        .args(["agent", "--role", "relay"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown role `relay`"));
}
