//! TLS with the real Postfix and Dovecot: a certificate made in the test (openssl, which Debian's
//! dovecot-core pulls in through ssl-cert), a rustls client that verifies it. Submission offers STARTTLS,
//! refuses AUTH and mail before it, and accepts both after; the IMAP proxy refuses LOGIN before STARTTLS
//! and serves the mailbox after. Implicit TLS (RFC 8314: 465, 993, 995) answers with a handshake, and a
//! certificate renewed in the Secret volume the way the kubelet swaps it is what the next handshake shows.

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
        Self::trusting(tcp, &[cert])
    }

    /// A session that accepts a server presenting any one of `certs`.
    fn trusting(tcp: TcpStream, certs: &[&Path]) -> Self {
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(CertificateDer::from_pem_file(cert).unwrap())
                .unwrap();
        }
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

    /// The certificate the server presented (after the handshake, i.e. once a line was read).
    fn peer_certificate(&self) -> Vec<u8> {
        self.0
            .get_ref()
            .conn
            .peer_certificates()
            .expect("handshake done")[0]
            .to_vec()
    }

    /// The negotiated protocol version: proves the session really is encrypted.
    fn protocol(&self) -> String {
        format!("{:?}", self.0.get_ref().conn.protocol_version().unwrap())
    }
}

fn connect_from_other_address(port: u16) -> TcpStream {
    connect_from("127.0.0.2", port)
}

/// A TCP connection to 127.0.0.1:`port` from `address` (a loopback address other than the server's).
fn connect_from(address: &str, port: u16) -> TcpStream {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SockAddr::from(
            format!("{address}:0")
                .parse::<std::net::SocketAddr>()
                .unwrap(),
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

/// The DER of the certificate in `pem`.
fn der(pem: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

/// A TLS session opened with the handshake (implicit TLS) to `port`, from the clients' address; its first
/// line is the server's greeting.
fn implicit_tls(port: u16, certs: &[&Path]) -> (TlsSession, String) {
    let tcp = connect_from_other_address(port);
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut t = TlsSession::trusting(tcp, certs);
    let greeting = t.line();
    (t, greeting)
}

/// The certificate a STARTTLS on submission presents.
fn starttls_certificate(port: u16, certs: &[&Path]) -> Vec<u8> {
    let mut s = Session::connect(port);
    assert_eq!(s.smtp_reply().0, 220);
    assert_eq!(s.smtp("EHLO client.test").0, 250);
    assert_eq!(s.smtp("STARTTLS").0, 220);
    let mut t = TlsSession::trusting(s.into_stream(), certs);
    let (code, _) = t.smtp("EHLO client.test");
    assert_eq!(code, 250);
    let c = t.peer_certificate();
    t.smtp("QUIT");
    c
}

#[test]
fn implicit_tls_listens_and_a_renewed_certificate_reaches_every_handshake() {
    if !mail_software_present(
        "implicit_tls_listens_and_a_renewed_certificate_reaches_every_handshake",
    ) {
        return;
    }
    let mut site = Site::new(1_000_000);
    site.settings.tls = true;
    std::fs::write(
        site.config_dir().join("settings.yaml"),
        site.settings.to_yaml(),
    )
    .unwrap();
    let (old_dir, new_dir) = (
        site.root.path().join("cert-1"),
        site.root.path().join("cert-2"),
    );
    make_certificate(&old_dir);
    make_certificate(&new_dir);
    let (old, new) = (old_dir.join("tls.crt"), new_dir.join("tls.crt"));
    let both = [old.as_path(), new.as_path()];
    // The kubernetes.io/tls Secret as the kubelet mounts it: root-owned files at the rendered mode behind
    // `..data`.
    let secret =
        pod::KubeletVolume::new(site.root.path().join("tls-secret"), rendered_secret_mode());
    let publish = |dir: &Path| {
        secret.publish(&std::collections::BTreeMap::from(
            ["tls.crt", "tls.key"].map(|k| (k.to_string(), std::fs::read(dir.join(k)).unwrap())),
        ))
    };
    publish(&old_dir);
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("erin@example.com", 0, "erin-pw");
    site.publish();
    let tls_args = ["--tls-dir".to_string(), secret.dir.display().to_string()];
    let _store = Agent::start(&site, "store", "store", &ps);
    let sub = Agent::start_with(&site, "submission", "submission", &Ports::free(), &tls_args);
    let imap = Agent::start_with(&site, "imap", "imap", &Ports::free(), &tls_args);
    let pop3 = Agent::start_with(&site, "pop3", "pop3", &Ports::free(), &tls_args);
    let implicit = [
        ("submissions", sub.ports.submissions, "220 "),
        ("imaps", imap.ports.imaps, "* OK"),
        ("pop3s", pop3.ports.pop3s, "+OK"),
    ];

    // Implicit TLS answers with a handshake and the service's greeting, and serves logins.
    for (name, port, greeting) in implicit {
        let (t, g) = implicit_tls(port, &[&old]);
        assert!(g.starts_with(greeting), "{name}: {g:?}");
        assert_eq!(t.peer_certificate(), der(&old), "{name}");
    }
    let (mut t, _) = implicit_tls(sub.ports.submissions, &[&old]);
    let (code, ehlo) = t.smtp("EHLO client.test");
    assert!(code == 250 && ehlo.contains("AUTH PLAIN"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "already encrypted: {ehlo}");
    assert_eq!(t.smtp(&auth_plain("erin@example.com", "erin-pw")).0, 235);
    t.smtp("QUIT");
    let (mut t, _) = implicit_tls(imap.ports.imaps, &[&old]);
    let (_, st) = t.imap("LOGIN erin@example.com erin-pw");
    assert!(st.starts_with("t OK"), "{st}");
    t.imap("LOGOUT");
    let (mut t, _) = implicit_tls(pop3.ports.pop3s, &[&old]);
    t.send("USER erin@example.com\r\n");
    assert!(t.line().starts_with("+OK"));
    t.send("PASS erin-pw\r\n");
    let l = t.line();
    assert!(l.starts_with("+OK"), "POP3 over implicit TLS: {l}");
    t.send("QUIT\r\n");
    assert_eq!(
        starttls_certificate(sub.ports.submission, &[&old]),
        der(&old)
    );

    // Renewal: the kubelet swaps `..data` to a directory with the new pair; the daemons reload.
    let renewed = std::time::Instant::now();
    publish(&new_dir);
    for (name, port, _) in implicit {
        wait_for(
            &format!("{name} to present the renewed certificate"),
            WAIT,
            || (implicit_tls(port, &both).0.peer_certificate() == der(&new)).then_some(()),
        );
    }
    wait_for(
        "submission's STARTTLS to present the renewed certificate",
        WAIT,
        || (starttls_certificate(sub.ports.submission, &both) == der(&new)).then_some(()),
    );
    eprintln!(
        "renewed certificate presented on 465, 993, 995 and 587 (STARTTLS) {:.1} s after the swap",
        renewed.elapsed().as_secs_f64()
    );
    let (_, st) = {
        let (mut t, _) = implicit_tls(imap.ports.imaps, &[&new]);
        t.imap("LOGIN erin@example.com erin-pw")
    };
    assert!(st.starts_with("t OK"), "logins after the renewal: {st}");
}

/// An IMAP session through the proxy's implicit TLS from `address`, logged in as `user`; the tagged reply
/// of LOGIN.
fn imaps_login(
    port: u16,
    cert: &Path,
    address: &str,
    user: &str,
    password: &str,
) -> (TlsSession, String) {
    let tcp = connect_from(address, port);
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut t = TlsSession::upgrade(tcp, cert);
    let greeting = t.line();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    let (_, st) = t.imap(&format!("LOGIN {user} {password}"));
    (t, st)
}

/// The imap proxy passes each client's address on to the store, which trusts it from the proxies'
/// networks only (`trustedProxyNetworks`): the store's log names the client, and the per-user-and-IP
/// connection limit (Dovecot's default, 10) stops the client that reaches it, while the same user from
/// another address still gets in. Without the forwarding every session would count as the proxy's
/// address and the second client would be refused too. A client that reaches the store directly cannot
/// claim another address.
#[test]
fn the_store_sees_each_clients_address_through_the_proxy_and_limits_it_alone() {
    if !mail_software_present(
        "the_store_sees_each_clients_address_through_the_proxy_and_limits_it_alone",
    ) {
        return;
    }
    let mut site = Site::new(1_000_000);
    site.settings.tls = true;
    // The proxy reaches the store from 127.0.0.1; the clients are 127.0.0.2 and 127.0.0.3.
    site.settings.features.trusted_proxy_networks = vec!["127.0.0.1/32".into()];
    std::fs::write(
        site.config_dir().join("settings.yaml"),
        site.settings.to_yaml(),
    )
    .unwrap();
    let dir = site.root.path().join("cert");
    make_certificate(&dir);
    let cert = dir.join("tls.crt");
    let secret =
        pod::KubeletVolume::new(site.root.path().join("tls-secret"), rendered_secret_mode());
    secret.publish(&std::collections::BTreeMap::from(
        ["tls.crt", "tls.key"].map(|k| (k.to_string(), std::fs::read(dir.join(k)).unwrap())),
    ));
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox("erin@example.com", 0, "erin-pw");
    site.publish();
    let tls_args = ["--tls-dir".to_string(), secret.dir.display().to_string()];
    let store = Agent::start(&site, "store", "store", &ps);
    let imap = Agent::start_with(&site, "imap", "imap", &Ports::free(), &tls_args);
    let store_log =
        || std::fs::read_to_string(store.work.join("log/dovecot.log")).unwrap_or_default();

    let mut open = vec![];
    for _ in 0..10 {
        let (t, st) = imaps_login(
            imap.ports.imaps,
            &cert,
            "127.0.0.2",
            "erin@example.com",
            "erin-pw",
        );
        assert!(st.starts_with("t OK"), "{st}");
        open.push(t);
    }
    let logins = |ip: &str| {
        store_log()
            .lines()
            .filter(|l| {
                l.contains("imap-login: Info: Login: user=<erin@example.com>")
                    && l.contains(&format!("rip={ip},"))
            })
            .count()
    };
    assert_eq!(
        logins("127.0.0.2"),
        10,
        "the store logs the client: {}",
        store_log()
    );
    assert_eq!(logins("127.0.0.1"), 0, "not the proxy");
    let (_, st) = imaps_login(
        imap.ports.imaps,
        &cert,
        "127.0.0.2",
        "erin@example.com",
        "erin-pw",
    );
    assert!(
        !st.starts_with("t OK"),
        "an eleventh session from 127.0.0.2 is over the limit: {st}"
    );
    wait_for("the store's refusal logged", WAIT, || {
        store_log()
            .contains("Maximum number of connections from user+IP exceeded")
            .then_some(())
    });
    let (mut other, st) = imaps_login(
        imap.ports.imaps,
        &cert,
        "127.0.0.3",
        "erin@example.com",
        "erin-pw",
    );
    assert!(
        st.starts_with("t OK"),
        "another client is not limited by the first: {st}"
    );
    assert_eq!(logins("127.0.0.3"), 1);
    other.imap("LOGOUT");

    // Straight to the store, a client's claim of another address is not believed.
    let tcp = connect_from("127.0.0.3", ps.imap);
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut s = Session::from_stream(tcp);
    assert!(s.line().starts_with("* OK"));
    let _ = s.imap("ID (\"x-originating-ip\" \"192.0.2.7\")");
    let _ = s.imap("LOGIN erin@example.com erin-pw");
    let _ = s.imap("LOGOUT");
    wait_for("the direct attempt logged", WAIT, || {
        store_log()
            .lines()
            .any(|l| {
                l.contains("imap-login")
                    && l.contains("rip=127.0.0.3, lip=127.0.0.1")
                    && !l.contains("proxy")
            })
            .then_some(())
    });
    assert!(!store_log().contains("192.0.2.7"), "{}", store_log());
    for mut t in open {
        t.imap("LOGOUT");
    }
}
