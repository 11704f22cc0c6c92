//! Another mail server on the network, as mx and submission meet one: the next hop of a relay domain,
//! an outside domain's MX. It answers by name through the site's cluster DNS, listens on 127.0.0.1 only,
//! takes the recipients `accepts` says yes to (550 5.1.1 for the rest) and hands each message over.
//! One thread per connection, all ended when the value is dropped.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use super::{Site, IO_TIMEOUT};

/// One message as the server received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
}

pub struct Downstream {
    /// The fully qualified name cluster DNS gives it.
    pub host: String,
    pub port: u16,
    /// Every `RCPT TO` it was asked, accepted or not (verification probes included).
    pub asked: Arc<Mutex<Vec<String>>>,
    rx: mpsc::Receiver<Received>,
    stop: Arc<AtomicBool>,
}

impl Downstream {
    /// Starts a server named `name` (a Service name in the site's namespace).
    pub fn start(
        site: &Site,
        name: &str,
        accepts: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        let host = super::pod::cluster_name(name);
        site.dns.set(&host, std::net::Ipv4Addr::LOCALHOST);
        let port = super::free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(Mutex::new(vec![]));
        let accepts = Arc::new(accepts);
        {
            let (stop, asked) = (stop.clone(), asked.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            let (tx, asked, accepts) = (tx.clone(), asked.clone(), accepts.clone());
                            std::thread::spawn(move || {
                                serve(s, &tx, &asked, &*accepts);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            });
        }
        Self {
            host,
            port,
            asked,
            rx,
            stop,
        }
    }

    /// `[host]:port`, a Postfix next hop that skips the MX lookup.
    pub fn next_hop(&self) -> String {
        format!("[{}]:{}", self.host, self.port)
    }

    /// The next message received within `timeout`.
    pub fn receive(&self, timeout: Duration) -> Option<Received> {
        self.rx.recv_timeout(timeout).ok()
    }
}

impl Drop for Downstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    stream: TcpStream,
    tx: &mpsc::Sender<Received>,
    asked: &Mutex<Vec<String>>,
    accepts: &dyn Fn(&str) -> bool,
) {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut say = |t: &str| w.write_all(format!("{t}\r\n").as_bytes());
    let _ = say("220 downstream.test ESMTP");
    let (mut from, mut to) = (String::new(), Vec::new());
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 {
            return;
        }
        let upper = l.to_ascii_uppercase();
        let arg = |n: usize| {
            l[n..]
                .trim()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or_default()
                .to_string()
        };
        if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            let _ = say("250 downstream.test");
        } else if upper.starts_with("MAIL FROM:") {
            from = arg(10);
            to.clear();
            let _ = say("250 2.1.0 ok");
        } else if upper.starts_with("RCPT TO:") {
            let rcpt = arg(8);
            asked.lock().unwrap().push(rcpt.clone());
            if accepts(&rcpt) {
                to.push(rcpt);
                let _ = say("250 2.1.5 ok");
            } else {
                let _ = say("550 5.1.1 no such user here");
            }
        } else if upper.starts_with("DATA") {
            let _ = say("354 go ahead");
            let mut data = String::new();
            loop {
                let mut d = String::new();
                if r.read_line(&mut d).unwrap_or(0) == 0 || d == ".\r\n" {
                    break;
                }
                data.push_str(&d);
            }
            let _ = say("250 2.0.0 queued");
            let _ = tx.send(Received {
                from: from.clone(),
                to: to.clone(),
                data,
            });
        } else if upper.starts_with("QUIT") {
            let _ = say("221 bye");
            return;
        } else {
            let _ = say("250 ok");
        }
    }
}
