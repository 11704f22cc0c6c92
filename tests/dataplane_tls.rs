//! TLS with the real Postfix and Dovecot: a certificate made in the test (openssl, which Debian's
//! dovecot-core pulls in through ssl-cert), a rustls client that verifies it. Submission offers STARTTLS,
//! refuses AUTH and mail before it, and accepts both after; the IMAP proxy refuses LOGIN before STARTTLS
//! and serves the mailbox after.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use support::*;

const WAIT: Duration = Duration::from_secs(20);
const HOST: &str = "mail.example.com";

/// A self-signed end-entity certificate for `HOST` in `dir/tls.crt` and `dir/tls.key`.
fn make_certificate(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", &format!("/CN={HOST}")])
        .args(["-addext", &format!("subjectAltName=DNS:{HOST}")])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(dir.join("tls.key"))
        .arg("-out")
        .arg(dir.join("tls.crt"))
        .output()
        .expect("openssl is installed with Dovecot (dovecot-core -> ssl-cert -> openssl)");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A line session over TLS, trusting only the test's certificate.
struct TlsSession(BufReader<StreamOwned<ClientConnection, TcpStream>>);

impl TlsSession {
    fn upgrade(tcp: TcpStream, cert: &Path) -> Self {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(cert).unwrap())
            .unwrap();
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let conn =
            ClientConnection::new(Arc::new(config), ServerName::try_from(HOST).unwrap()).unwrap();
        Self(BufReader::new(StreamOwned::new(conn, tcp)))
    }

    fn send(&mut self, text: &str) {
        self.0.get_mut().write_all(text.as_bytes()).unwrap();
        self.0.get_mut().flush().unwrap();
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.0.read_line(&mut l).expect("reading over TLS");
        l
    }

    fn smtp(&mut self, command: &str) -> (u16, String) {
        self.send(&format!("{command}\r\n"));
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

    fn imap(&mut self, command: &str) -> (Vec<String>, String) {
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

    /// The negotiated protocol version: proves the session really is encrypted.
    fn protocol(&self) -> String {
        format!("{:?}", self.0.get_ref().conn.protocol_version().unwrap())
    }
}

fn connect_from_other_address(port: u16) -> TcpStream {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SockAddr::from(
            "127.0.0.2:0".parse::<std::net::SocketAddr>().unwrap(),
        ))
        .unwrap();
    socket
        .connect_timeout(
            &SockAddr::from(std::net::SocketAddr::from(([127, 0, 0, 1], port))),
            Duration::from_secs(5),
        )
        .unwrap();
    socket.into()
}

fn auth_plain(user: &str, password: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let data = format!("\0{user}\0{password}").into_bytes();
    let mut out = String::from("AUTH PLAIN ");
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                T[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

#[test]
fn submission_and_imap_require_starttls_before_authentication() {
    if !mail_software_present("submission_and_imap_require_starttls_before_authentication") {
        return;
    }
    let mut site = Site::new(1_000_000);
    site.settings.tls = true;
    std::fs::write(
        site.config_dir().join("settings.yaml"),
        site.settings.to_yaml(),
    )
    .unwrap();
    let tls_dir = site.root.path().join("tls");
    make_certificate(&tls_dir);
    let cert = tls_dir.join("tls.crt");
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("erin@example.com", 0, "erin-pw");
    site.publish();
    let tls_args = ["--tls-dir".to_string(), tls_dir.display().to_string()];
    let store = Agent::start(&site, "store", "store", &ps);
    let sub = Agent::start_with(&site, "submission", "submission", &Ports::free(), &tls_args);
    let imap = Agent::start_with(&site, "imap", "imap", &Ports::free(), &tls_args);

    // Submission in the clear: STARTTLS offered, AUTH neither offered nor accepted, no mail.
    let mut s = Session::connect(sub.ports.submission);
    assert_eq!(s.smtp_reply().0, 220);
    let (code, ehlo) = s.smtp("EHLO client.test");
    assert_eq!(code, 250);
    assert!(ehlo.contains("250-STARTTLS"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "AUTH offered before TLS: {ehlo}");
    let (code, text) = s.smtp(&auth_plain("erin@example.com", "erin-pw"));
    assert_eq!(code, 530, "AUTH before STARTTLS must be refused: {text}");
    assert!(text.contains("STARTTLS"), "{text}");
    let (code, text) = s.smtp("MAIL FROM:<erin@example.com>");
    assert_eq!(code, 530, "mail before STARTTLS must be refused: {text}");
    let (code, text) = s.smtp("STARTTLS");
    assert_eq!(code, 220, "{text}");

    // After STARTTLS (certificate verified against the test's own): AUTH offered, checked, mail accepted.
    let mut t = TlsSession::upgrade(s.into_stream(), &cert);
    let (code, ehlo) = t.smtp("EHLO client.test");
    assert_eq!(code, 250, "{ehlo}");
    assert!(t.protocol().starts_with("TLSv1_"), "{}", t.protocol());
    assert!(ehlo.contains("AUTH PLAIN"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(t.smtp(&auth_plain("erin@example.com", "wrong")).0, 535);
    let (code, text) = t.smtp(&auth_plain("erin@example.com", "erin-pw"));
    assert_eq!(code, 235, "{text}");
    assert_eq!(t.smtp("MAIL FROM:<erin@example.com>").0, 250);
    assert_eq!(t.smtp("RCPT TO:<erin@example.com>").0, 250);
    assert_eq!(t.smtp("DATA").0, 354);
    t.send(&message(
        "erin@example.com",
        &["erin@example.com"],
        "over-tls",
        100,
    ));
    let (code, text) = t.smtp(".");
    assert_eq!(code, 250, "{text}");
    t.smtp("QUIT");
    wait_for("the message submitted over TLS", WAIT, || {
        (maildir_subjects(&store, "erin@example.com") == ["over-tls"]).then_some(())
    });

    // IMAP proxy: LOGIN refused in the clear, served after STARTTLS. The client connects from another
    // loopback address, since Dovecot counts a client on its own address as secure.
    let mut s = Session::from_stream(connect_from_other_address(imap.ports.imap));
    let greeting = s.line();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let (caps, _) = s.imap("CAPABILITY");
    let caps = caps.concat();
    assert!(
        caps.contains("STARTTLS") && caps.contains("LOGINDISABLED"),
        "{caps}"
    );
    let (_, st) = s.imap("LOGIN erin@example.com erin-pw");
    assert!(
        !st.starts_with("t OK"),
        "LOGIN before STARTTLS must fail: {st}"
    );
    let (_, st) = s.imap("STARTTLS");
    assert!(st.starts_with("t OK"), "{st}");
    let mut t = TlsSession::upgrade(s.into_stream(), &cert);
    let (_, st) = t.imap("LOGIN erin@example.com erin-pw");
    assert!(st.starts_with("t OK"), "{st}");
    let (untagged, st) = t.imap("SELECT INBOX");
    assert!(st.starts_with("t OK"), "{st}");
    assert!(
        untagged.iter().any(|l| l.trim_end() == "* 1 EXISTS"),
        "{untagged:?}"
    );
    t.imap("LOGOUT");
}
