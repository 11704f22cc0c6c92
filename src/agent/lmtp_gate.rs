//! The store's LMTP port: a small LMTP-aware relay in front of Dovecot's LMTP socket that can pause
//! delivery for a snapshot.
//!
//! Why a relay rather than a Dovecot setting: Dovecot has no "pause" for LMTP, and removing its listener
//! makes Postfix see connection refusals, not a clean 4xx, and says nothing about deliveries in flight. The
//! gate answers `421 4.3.2` to new sessions and to the next `MAIL FROM` of open (cached) sessions while
//! paused, so Postfix defers and keeps the mail queued; a transaction already past `MAIL FROM` finishes.
//! It hides `PIPELINING` from the LHLO reply so every command waits for its answer, which lets the relay
//! know exactly when message data starts without parsing pipelined replies. A pause expires by itself at
//! its deadline, so a snapshot job that dies cannot leave a store paused.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::Notify;

/// Longest line accepted in either direction; Postfix never sends lines near this (998 octets).
const MAX_LINE: usize = 1 << 20;

/// Pause state shared by the HTTP API and the LMTP sessions.
pub struct Gate {
    backend: PathBuf,
    hostname: String,
    paused_until: Mutex<Option<Instant>>,
    in_transaction: AtomicUsize,
    idle: Notify,
    /// Whether this store may take writes: false on a replica that is not its LUN's active (agent::role).
    granted: AtomicBool,
    /// New transactions wait until then: a mailbox's home just moved (its LUN took the address back), and
    /// Dovecot may still deliver by the userdb it read before.
    held_until: Mutex<Option<Instant>>,
}

/// Result of a pause request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PauseOutcome {
    /// Every transaction in flight when the pause began has finished.
    pub drained: bool,
    pub in_transaction: usize,
}

impl Gate {
    pub fn new(backend: PathBuf, hostname: String) -> Arc<Self> {
        Arc::new(Self {
            backend,
            hostname,
            paused_until: Mutex::new(None),
            in_transaction: AtomicUsize::new(0),
            idle: Notify::new(),
            granted: AtomicBool::new(true),
            held_until: Mutex::new(None),
        })
    }

    /// Refuses new transactions (`421`, so the mail waits in the sender's queue) for `d` from now.
    pub fn hold(&self, d: Duration) {
        *self.held_until.lock().expect("gate lock") = Some(Instant::now() + d);
        tracing::info!(
            ms = d.as_millis() as u64,
            "LMTP held while a mailbox home moves"
        );
    }

    fn is_held(&self) -> bool {
        self.held_until
            .lock()
            .expect("gate lock")
            .is_some_and(|t| Instant::now() < t)
    }

    /// Grants or revokes writes (see agent::role). Revoked, new sessions and the next `MAIL FROM` of open
    /// ones get `421`; a transaction already past `MAIL FROM` finishes.
    pub fn set_granted(&self, granted: bool) {
        if self.granted.swap(granted, Ordering::SeqCst) != granted {
            tracing::info!(granted, "LMTP write grant changed");
        }
    }

    pub fn is_granted(&self) -> bool {
        self.granted.load(Ordering::SeqCst)
    }

    /// The refusal for a new transaction now, if any: paused for a snapshot, or not the active.
    fn refuse_now(&self) -> Option<String> {
        if !self.is_granted() {
            return Some(format!(
                "421 4.3.2 {} is not the active replica of its LUN, try again later\r\n",
                self.hostname
            ));
        }
        if self.is_held() {
            return Some(format!(
                "421 4.3.2 {} is applying a mailbox change, try again later\r\n",
                self.hostname
            ));
        }
        self.is_paused().then(|| self.refusal())
    }

    pub fn is_paused(&self) -> bool {
        let mut until = self.paused_until.lock().expect("gate lock");
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *until = None;
                tracing::info!("LMTP pause deadline reached: delivery resumed");
                false
            }
            None => false,
        }
    }

    /// Seconds until the pause expires (0 when not paused).
    pub fn remaining(&self) -> Duration {
        let until = *self.paused_until.lock().expect("gate lock");
        until
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Pauses until `deadline` from now, then waits up to `drain_timeout` for transactions in flight.
    pub async fn pause(&self, deadline: Duration, drain_timeout: Duration) -> PauseOutcome {
        *self.paused_until.lock().expect("gate lock") = Some(Instant::now() + deadline);
        tracing::info!(seconds = deadline.as_secs(), "LMTP delivery paused");
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.in_transaction.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let drained = tokio::time::timeout(drain_timeout, wait).await.is_ok();
        PauseOutcome {
            drained,
            in_transaction: self.in_transaction.load(Ordering::SeqCst),
        }
    }

    pub fn resume(&self) {
        *self.paused_until.lock().expect("gate lock") = None;
        tracing::info!("LMTP delivery resumed");
    }

    pub fn in_transaction(&self) -> usize {
        self.in_transaction.load(Ordering::SeqCst)
    }

    fn refusal(&self) -> String {
        format!(
            "421 4.3.2 {} delivery paused for a snapshot, try again later\r\n",
            self.hostname
        )
    }
}

/// Accepts LMTP sessions until the listener fails.
pub async fn serve(gate: Arc<Gate>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                let gate = gate.clone();
                tokio::spawn(async move {
                    if let Err(e) = session(&gate, client).await {
                        tracing::debug!(error = %e, "LMTP session ended with an error");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "LMTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Marks one session's transaction; dropping it (session end) releases it.
struct Transaction<'a> {
    gate: &'a Gate,
    open: bool,
}

impl Transaction<'_> {
    fn begin(&mut self) {
        if !self.open {
            self.open = true;
            self.gate.in_transaction.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn end(&mut self) {
        if self.open {
            self.open = false;
            self.gate.in_transaction.fetch_sub(1, Ordering::SeqCst);
            self.gate.idle.notify_waiters();
        }
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

#[derive(PartialEq)]
enum State {
    Command,
    /// DATA was sent; the next client line is content only if the store answered 354.
    AwaitDataReply,
    Content,
}

async fn session(gate: &Gate, mut client: TcpStream) -> std::io::Result<()> {
    if let Some(refusal) = gate.refuse_now() {
        client.write_all(refusal.as_bytes()).await?;
        return client.shutdown().await;
    }
    let backend = match UnixStream::connect(&gate.backend).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, socket = %gate.backend.display(), "Dovecot LMTP unavailable");
            client
                .write_all(
                    format!(
                        "421 4.3.0 {} store unavailable, try again later\r\n",
                        gate.hostname
                    )
                    .as_bytes(),
                )
                .await?;
            return client.shutdown().await;
        }
    };
    let (client_r, client_w) = client.into_split();
    let (backend_r, mut backend_w) = backend.into_split();
    let client_w = Arc::new(tokio::sync::Mutex::new(client_w));
    let last_code = Arc::new(AtomicU16::new(0));
    // The command the next reply answers (no pipelining: one at a time): an RCPT the store does not know
    // is answered 450, not Dovecot's 550.
    let rcpt = Arc::new(AtomicBool::new(false));

    // Store -> client: copy replies, hiding PIPELINING and noting each reply's code.
    let replies = {
        let client_w = client_w.clone();
        let last_code = last_code.clone();
        let rcpt = rcpt.clone();
        async move {
            let mut r = BufReader::new(backend_r);
            let mut line = Vec::new();
            loop {
                line.clear();
                if read_line(&mut r, &mut line).await? == 0 {
                    return Ok::<_, std::io::Error>(());
                }
                if line.len() >= 4 && line[3] == b' ' {
                    let code = std::str::from_utf8(&line[..3])
                        .ok()
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    last_code.store(code, Ordering::SeqCst);
                }
                if rcpt.load(Ordering::SeqCst) && line.starts_with(b"550 5.1.1 ") {
                    line = unknown_here(&line[b"550 5.1.1 ".len()..]);
                    last_code.store(450, Ordering::SeqCst);
                }
                if line.len() > 4 && line[4..].to_ascii_uppercase().starts_with(b"PIPELINING") {
                    line.truncate(4);
                    line.extend_from_slice(b"X-MAILPOD-GATE\r\n");
                }
                client_w.lock().await.write_all(&line).await?;
            }
        }
    };

    // Client -> store: follow the transaction state, refuse new transactions while paused.
    let commands = async {
        let mut r = BufReader::new(client_r);
        let mut tx = Transaction { gate, open: false };
        let mut state = State::Command;
        let mut line = Vec::new();
        loop {
            line.clear();
            if read_line(&mut r, &mut line).await? == 0 {
                return Ok::<_, std::io::Error>(());
            }
            if state == State::AwaitDataReply {
                state = if last_code.load(Ordering::SeqCst) == 354 {
                    State::Content
                } else {
                    State::Command
                };
            }
            match state {
                State::Content => {
                    if line == b".\r\n" || line == b".\n" {
                        // The transaction ends when the client moves on (next command or close): only then
                        // has it read every per-recipient reply.
                        state = State::Command;
                    }
                }
                State::Command | State::AwaitDataReply => {
                    let verb = line
                        .get(..4)
                        .map(|v| v.to_ascii_uppercase())
                        .unwrap_or_default();
                    rcpt.store(verb.as_slice() == b"RCPT", Ordering::SeqCst);
                    match verb.as_slice() {
                        b"MAIL" => {
                            tx.end();
                            if let Some(refusal) = gate.refuse_now() {
                                let mut w = client_w.lock().await;
                                w.write_all(refusal.as_bytes()).await?;
                                w.shutdown().await?;
                                return Ok(());
                            }
                            tx.begin();
                        }
                        b"DATA" => state = State::AwaitDataReply,
                        b"RSET" | b"QUIT" | b"LHLO" => tx.end(),
                        _ => {}
                    }
                }
            }
            backend_w.write_all(&line).await?;
        }
    };

    // Either side closing ends the session; the other half is dropped with it.
    tokio::select! {
        r = replies => r,
        r = commands => r,
    }
}

/// The answer to a recipient Dovecot does not know (`550 5.1.1 <text>`): temporary. The mx routes here
/// only addresses its tables place on this LUN, so a store that does not know one has not read those
/// tables yet (each pod's copy of a ConfigMap is updated on its own); the mail waits in the mx queue
/// until it has, instead of bouncing, or landing in a home the address no longer has.
fn unknown_here(text: &[u8]) -> Vec<u8> {
    let mut line = b"450 4.1.1 ".to_vec();
    line.extend_from_slice(text.strip_suffix(b"\r\n").unwrap_or(text).trim_ascii_end());
    line.extend_from_slice(b" (not yet known to this store, try again later)\r\n");
    line
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let n = tokio::io::AsyncReadExt::take(&mut *r, MAX_LINE as u64)
        .read_until(b'\n', buf)
        .await?;
    if n == MAX_LINE && buf.last() != Some(&b'\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "LMTP line too long",
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A scripted LMTP server on a unix socket that records what it received.
    async fn fake_store(path: PathBuf) -> tokio::task::JoinHandle<Vec<u8>> {
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"220 store LMTP ready\r\n").await.unwrap();
            let mut seen = Vec::new();
            let mut data = false;
            let mut line = Vec::new();
            loop {
                line.clear();
                if r.read_until(b'\n', &mut line).await.unwrap() == 0 {
                    return seen;
                }
                seen.extend_from_slice(&line);
                let reply: &[u8] = if data {
                    if line == b".\r\n" {
                        data = false;
                        b"250 2.0.0 saved\r\n"
                    } else {
                        continue;
                    }
                } else if line.starts_with(b"LHLO") {
                    b"250-store\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
                } else if line.starts_with(b"DATA") {
                    data = true;
                    b"354 go ahead\r\n"
                } else if line.starts_with(b"QUIT") {
                    b"221 bye\r\n"
                } else if line.starts_with(b"RCPT TO:<unknown@") {
                    b"550 5.1.1 <unknown@x> User doesn't exist: unknown@x\r\n"
                } else {
                    b"250 ok\r\n"
                };
                w.write_all(reply).await.unwrap();
            }
        })
    }

    async fn expect(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>, prefix: &str) -> String {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
            .await
            .unwrap()
            .unwrap();
        assert!(
            line.starts_with(prefix),
            "expected `{prefix}`, got {line:?}"
        );
        line
    }

    #[tokio::test]
    async fn without_the_write_grant_new_sessions_and_cached_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("lmtp");
        let store = fake_store(sock.clone()).await;
        let gate = Gate::new(sock, "store.test".into());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(gate.clone(), listener));

        // A cached session opened while this store was the active.
        let (r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut r = BufReader::new(r);
        expect(&mut r, "220").await;
        w.write_all(b"LHLO mx\r\n").await.unwrap();
        expect(&mut r, "250-store").await;
        expect(&mut r, "250-X-MAILPOD-GATE").await;
        expect(&mut r, "250 ENHANCED").await;
        // Demoted: its next transaction is refused, and so is a new session.
        gate.set_granted(false);
        w.write_all(b"MAIL FROM:<a@x>\r\n").await.unwrap();
        let refusal = expect(&mut r, "421 4.3.2").await;
        assert!(refusal.contains("not the active replica"), "{refusal}");
        let seen = String::from_utf8(store.await.unwrap()).unwrap();
        assert!(!seen.contains("MAIL FROM"), "{seen}");
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut greeting = String::new();
        s.read_to_string(&mut greeting).await.unwrap();
        assert!(
            greeting.starts_with("421 4.3.2 store.test is not the active"),
            "{greeting}"
        );
    }

    #[tokio::test]
    async fn an_unknown_recipient_waits_and_a_held_gate_refuses_new_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("lmtp");
        let store = fake_store(sock.clone()).await;
        let gate = Gate::new(sock, "store.test".into());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(gate.clone(), listener));

        let (r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut r = BufReader::new(r);
        expect(&mut r, "220").await;
        w.write_all(b"LHLO mx\r\n").await.unwrap();
        expect(&mut r, "250-store").await;
        expect(&mut r, "250-X-MAILPOD-GATE").await;
        expect(&mut r, "250 ENHANCED").await;
        w.write_all(b"MAIL FROM:<a@x>\r\n").await.unwrap();
        expect(&mut r, "250").await;
        w.write_all(b"RCPT TO:<unknown@x>\r\n").await.unwrap();
        let reply = expect(&mut r, "450 4.1.1 <unknown@x> User doesn't exist").await;
        assert!(reply.ends_with("try again later)\r\n"), "{reply:?}");
        // Only RCPT replies are changed.
        w.write_all(b"RCPT TO:<b@x>\r\n").await.unwrap();
        expect(&mut r, "250 ok").await;
        w.write_all(b"RSET\r\n").await.unwrap();
        expect(&mut r, "250 ok").await;
        // Held: the next transaction and a new session are refused, and the hold ends by itself.
        gate.hold(Duration::from_millis(300));
        w.write_all(b"MAIL FROM:<a@x>\r\n").await.unwrap();
        let refusal = expect(&mut r, "421 4.3.2").await;
        assert!(refusal.contains("applying a mailbox change"), "{refusal}");
        let seen = String::from_utf8(store.await.unwrap()).unwrap();
        assert_eq!(seen.matches("MAIL FROM").count(), 1, "{seen}");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(gate.refuse_now().is_none());
    }

    #[tokio::test]
    async fn relays_hides_pipelining_and_refuses_next_transaction_when_paused() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("lmtp");
        let store = fake_store(sock.clone()).await;
        let gate = Gate::new(sock, "store.test".into());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(gate.clone(), listener));

        let (r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut r = BufReader::new(r);
        expect(&mut r, "220").await;
        w.write_all(b"LHLO mx\r\n").await.unwrap();
        expect(&mut r, "250-store").await;
        expect(&mut r, "250-X-MAILPOD-GATE").await;
        expect(&mut r, "250 ENHANCED").await;
        w.write_all(b"MAIL FROM:<a@x>\r\n").await.unwrap();
        expect(&mut r, "250").await;
        assert_eq!(gate.in_transaction(), 1);
        // A pause while the transaction runs does not cut it, and waits for it.
        let pausing = {
            let gate = gate.clone();
            tokio::spawn(async move {
                gate.pause(Duration::from_secs(30), Duration::from_secs(5))
                    .await
            })
        };
        w.write_all(b"RCPT TO:<b@x>\r\n").await.unwrap();
        expect(&mut r, "250").await;
        w.write_all(b"DATA\r\n").await.unwrap();
        expect(&mut r, "354").await;
        w.write_all(b"MAIL FROM: is content here\r\n.\r\n")
            .await
            .unwrap();
        expect(&mut r, "250 2.0.0 saved").await;
        // The next transaction on the same (cached) session is refused with a 4xx.
        w.write_all(b"MAIL FROM:<c@x>\r\n").await.unwrap();
        expect(&mut r, "421 4.3.2").await;
        let outcome = pausing.await.unwrap();
        assert_eq!(
            outcome,
            PauseOutcome {
                drained: true,
                in_transaction: 0
            }
        );
        let seen = String::from_utf8(store.await.unwrap()).unwrap();
        assert!(seen.contains("MAIL FROM: is content here\r\n.\r\n"));
        assert!(
            !seen.contains("<c@x>"),
            "refused command must not reach the store: {seen}"
        );

        // New sessions are refused at once while paused, and accepted after resume.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut greeting = String::new();
        s.read_to_string(&mut greeting).await.unwrap();
        assert!(greeting.starts_with("421 4.3.2 store.test"), "{greeting}");
        gate.resume();
        assert!(!gate.is_paused());
    }

    #[tokio::test]
    async fn pause_expires_at_its_deadline() {
        let gate = Gate::new("/nonexistent".into(), "h".into());
        let outcome = gate
            .pause(Duration::from_millis(50), Duration::from_secs(1))
            .await;
        assert!(outcome.drained);
        assert!(gate.is_paused());
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(!gate.is_paused());
        assert_eq!(gate.remaining(), Duration::ZERO);
    }
}
