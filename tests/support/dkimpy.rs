//! An independent DKIM verifier for the tests: dkimpy (Debian's python3-dkim), its DNS answering only
//! the record under test.

const VERIFIER: &str = "/usr/bin/python3";

/// dkimpy's verdict on `message`, with `record` as the only TXT record at `<selector>._domainkey.<domain>`.
pub fn dkimpy_verifies(
    message: &str,
    domain: &str,
    selector: &str,
    record: &str,
) -> Result<(), String> {
    let script = r#"
import sys, dkim
name, record = sys.argv[1].encode() + b".", sys.argv[2].encode()
def dns(n, timeout=5):
    return record if n == name else None
message = sys.stdin.buffer.read()
d = dkim.DKIM(message)
ok = d.verify(dnsfunc=dns)
print("verified" if ok else "failed", d.domain.decode() if d.domain else "-", d.selector.decode() if d.selector else "-")
sys.exit(0 if ok else 1)
"#;
    let mut child = std::process::Command::new(VERIFIER)
        .args([
            "-c",
            script,
            &format!("{selector}._domainkey.{domain}"),
            record,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{VERIFIER}: {e}"))?;
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(message.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && text.starts_with(&format!("verified {domain} {selector}")) {
        Ok(())
    } else {
        Err(text)
    }
}

/// Whether dkimpy is installed; under CI its absence fails the test.
pub fn dkimpy_present(test: &str) -> bool {
    if std::path::Path::new("/usr/lib/python3/dist-packages/dkim/__init__.py").exists() {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "{test}: python3-dkim is missing (tests/packages.txt)"
    );
    eprintln!("SKIPPED {test}: python3-dkim is missing (tests/packages.txt)");
    false
}
