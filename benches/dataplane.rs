//! Data-plane benchmark: messages/s and delivery latency through the agent's rendered mx -> store path,
//! side by side with a stock Postfix -> Dovecot LMTP setup on the same machine, both driven by Postfix's
//! `smtp-source`. Not part of `cargo test`; run as root with Postfix and Dovecot installed:
//!
//! ```text
//! cargo bench --bench dataplane -- [--messages 2000] [--concurrency 10] [--size 4096] [--rounds 2]
//! ```
//!
//! - throughput: messages / (smtp-source start -> the last message's file in the Maildir);
//! - latency: Postfix's `delay=` of each LMTP delivery (message arrival during SMTP DATA -> delivered
//!   by Dovecot), from the maillog, at Postfix's default 10 ms resolution; p50 and p99.
//!
//! Stock means Debian's master.cf (with chroot off, as the agent runs it) and a main.cf holding only what
//! delivery to Dovecot LMTP needs; Dovecot with LMTP on TCP and a static userdb. The rendered path adds
//! postscreen, the access-table lookups, and the agent's LMTP pause gate in front of Dovecot.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mailpod_operator::agent::metrics::parse_delivery;
use support::*;

const BENCH: &str = "bench@example.com";
const WARM: &str = "warm@example.com";
const WARM_MESSAGES: usize = 50;
const DEADLINE: Duration = Duration::from_secs(120);

struct Options {
    messages: usize,
    concurrency: usize,
    size: usize,
    rounds: usize,
}

fn options() -> Options {
    let mut o = Options {
        messages: 2000,
        concurrency: 10,
        size: 4096,
        rounds: 2,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = || -> usize {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--messages" => o.messages = value(),
            "--concurrency" => o.concurrency = value(),
            "--size" => o.size = value(),
            "--rounds" => o.rounds = value(),
            // cargo bench passes --bench.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// Where a setup takes mail and where it puts it.
struct Target {
    name: &'static str,
    smtp: u16,
    maillog: PathBuf,
    maildir: PathBuf,
    warm: PathBuf,
}

struct Figures {
    seconds: f64,
    per_second: f64,
    p50: f64,
    p99: f64,
}

fn main() {
    if !mail_software_present("dataplane benchmark") {
        return;
    }
    let smtp_source = ["/usr/sbin/smtp-source", "/usr/bin/smtp-source"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("smtp-source (ships with Debian's postfix package)");
    let o = options();

    let mut site = Site::new(10_000_000);
    let store_ports = Ports::free();
    site.lun(0, &store_ports);
    site.mailbox(BENCH, 0, "pw");
    site.mailbox(WARM, 0, "pw");
    site.publish();
    let store = Agent::start(&site, "store", "store", &store_ports);
    let mx = Agent::start(&site, "mx", "mx", &Ports::free());
    let rendered = Target {
        name: "rendered (mx agent -> store agent)",
        smtp: mx.ports.smtp,
        maillog: mx.work.join("log/postfix.log"),
        maildir: store.work.join("mail/example.com/bench/Maildir"),
        warm: store.work.join("mail/example.com/warm/Maildir"),
    };
    let stock_setup = Stock::start();
    let stock = Target {
        name: "stock Postfix -> Dovecot LMTP",
        smtp: stock_setup.smtp,
        maillog: stock_setup.root.path().join("postfix.log"),
        maildir: stock_setup
            .root
            .path()
            .join("mail/example.com/bench/Maildir"),
        warm: stock_setup
            .root
            .path()
            .join("mail/example.com/warm/Maildir"),
    };

    // Warm-up: process start-up, and postscreen's first-contact greeting wait, are not what is measured.
    for t in [&rendered, &stock] {
        send(
            smtp_source,
            t.smtp,
            WARM,
            WARM_MESSAGES,
            o.concurrency,
            o.size,
        );
        wait_count(&t.warm, WARM_MESSAGES, t.name);
    }

    let mut results: Vec<(&str, Figures)> = Vec::new();
    let mut delivered = 0;
    for round in 0..o.rounds {
        delivered += o.messages;
        for t in [&rendered, &stock] {
            let f = measure(smtp_source, t, &o, delivered);
            eprintln!(
                "round {}: {}: {} messages in {:.2} s",
                round + 1,
                t.name,
                o.messages,
                f.seconds
            );
            results.push((t.name, f));
        }
    }

    let mean = |name: &str, f: fn(&Figures) -> f64| {
        let v: Vec<f64> = results
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, r)| f(r))
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    println!(
        "\n{} messages x {} rounds, {} bytes, {} concurrent SMTP sessions; nproc {}\n",
        o.messages,
        o.rounds,
        o.size,
        o.concurrency,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| setup | messages/s | p50 delivery | p99 delivery |");
    println!("|-------|-----------:|-------------:|-------------:|");
    for t in [&rendered, &stock] {
        println!(
            "| {} | {:.0} | {:.0} ms | {:.0} ms |",
            t.name,
            mean(t.name, |f| f.per_second),
            mean(t.name, |f| f.p50) * 1e3,
            mean(t.name, |f| f.p99) * 1e3
        );
    }
    let ratio = |f: fn(&Figures) -> f64| mean(rendered.name, f) / mean(stock.name, f);
    println!(
        "\nrendered / stock: throughput {:.2}, p50 latency {:.2}, p99 latency {:.2}",
        ratio(|f| f.per_second),
        ratio(|f| f.p50),
        ratio(|f| f.p99)
    );
}

/// One round: `o.messages` to the bench mailbox, until the Maildir holds `total`.
fn measure(smtp_source: &str, t: &Target, o: &Options, total: usize) -> Figures {
    let log_start = std::fs::metadata(&t.maillog).map_or(0, |m| m.len());
    let start = Instant::now();
    send(
        smtp_source,
        t.smtp,
        BENCH,
        o.messages,
        o.concurrency,
        o.size,
    );
    wait_count(&t.maildir, total, t.name);
    let seconds = start.elapsed().as_secs_f64();
    // Postfix writes the delivery line right after Dovecot's answer; give the log a moment.
    let mut delays = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while delays.len() < o.messages && Instant::now() < until {
        delays = delivery_delays(&t.maillog, log_start);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        delays.len(),
        o.messages,
        "{}: one delivery line per message",
        t.name
    );
    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| delays[((delays.len() - 1) as f64 * p).round() as usize];
    Figures {
        seconds,
        per_second: o.messages as f64 / seconds,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

fn send(smtp_source: &str, port: u16, to: &str, n: usize, concurrency: usize, size: usize) {
    let mut child = Command::new(smtp_source)
        .args(["-s", &concurrency.to_string(), "-m", &n.to_string()])
        .args(["-l", &size.to_string(), "-f", "load@remote.test", "-t", to])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .spawn()
        .expect("starting smtp-source");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "smtp-source failed: {status}");
            return;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("smtp-source did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_count(maildir: &Path, n: usize, name: &str) {
    let count = || {
        ["new", "cur"]
            .iter()
            .map(|d| std::fs::read_dir(maildir.join(d)).map_or(0, |e| e.count()))
            .sum::<usize>()
    };
    let start = Instant::now();
    loop {
        let have = count();
        if have >= n {
            assert_eq!(have, n, "{name}: more messages than sent");
            return;
        }
        if start.elapsed() > DEADLINE {
            panic!("{name}: {have} of {n} messages delivered within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `delay=` of every LMTP delivery to the bench mailbox logged after `offset`.
fn delivery_delays(maillog: &Path, offset: u64) -> Vec<f64> {
    let text = std::fs::read(maillog).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[(offset as usize).min(text.len())..]).into_owned();
    text.lines()
        .filter(|l| l.contains(&format!("to=<{BENCH}>")) && l.contains("/lmtp["))
        .filter_map(parse_delivery)
        .filter(|d| d.status == "sent")
        .map(|d| d.delay)
        .collect()
}

/// Postfix and Dovecot with their stock configuration plus what LMTP delivery needs, in a temp dir.
struct Stock {
    root: tempfile::TempDir,
    smtp: u16,
}

impl Stock {
    fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        run("chmod", &["755", dir.to_str().unwrap()]);
        let (smtp, lmtp) = (free_port(), free_port());
        let d = |p: &str| dir.join(p).display().to_string();
        for sub in ["postfix", "spool", "postfix-data", "dovecot-run", "mail"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        run("chown", &["postfix:postfix", &d("postfix-data")]);
        run("chown", &["5000:5000", &d("mail")]);

        std::fs::write(
            dir.join("dovecot.conf"),
            format!(
                "base_dir = {}\nstate_dir = {}\nlog_path = {}\nprotocols = lmtp\nlisten = 127.0.0.1\n\
                 ssl = no\nmail_uid = 5000\nmail_gid = 5000\nfirst_valid_uid = 5000\n\
                 mail_location = maildir:~/Maildir\n\
                 passdb {{\n  driver = static\n  args = nopassword=y\n}}\n\
                 userdb {{\n  driver = static\n  args = uid=5000 gid=5000 home={}/%d/%n allow_all_users=yes\n}}\n\
                 service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {lmtp}\n  }}\n}}\n",
                d("dovecot-run"),
                d("dovecot-run"),
                d("dovecot.log"),
                d("mail"),
            ),
        )
        .unwrap();
        daemon("dovecot", &["-c", &d("dovecot.conf")], dir);

        std::fs::write(
            dir.join("postfix/main.cf"),
            format!(
                "compatibility_level = 3.6\nqueue_directory = {}\ndata_directory = {}\n\
                 maillog_file_prefixes = /var, /dev/stdout, {}\nmaillog_file = {}\n\
                 inet_interfaces = 127.0.0.1\nmyhostname = stock.example.com\nmydestination =\n\
                 virtual_mailbox_domains = example.com\nvirtual_transport = lmtp:inet:127.0.0.1:{lmtp}\n",
                d("spool"),
                d("postfix-data"),
                dir.display(),
                d("postfix.log"),
            ),
        )
        .unwrap();
        // Debian's master.cf with the smtp listener on our port and chroot off (the queue is a temp dir
        // without the chroot's copies of /etc files), exactly as the agent runs its own.
        let master: String = std::fs::read_to_string("/etc/postfix/master.cf")
            .expect("/etc/postfix/master.cf")
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if l.starts_with(|c: char| c.is_whitespace() || c == '#') || f.len() < 8 {
                    return format!("{l}\n");
                }
                let service = if f[0] == "smtp" && f[1] == "inet" {
                    format!("127.0.0.1:{smtp}")
                } else {
                    f[0].to_string()
                };
                format!(
                    "{service} {} {} {} n {}\n",
                    f[1],
                    f[2],
                    f[3],
                    f[5..].join(" ")
                )
            })
            .collect();
        std::fs::write(dir.join("postfix/master.cf"), master).unwrap();
        run("postfix", &["-c", &d("postfix"), "set-permissions"]);
        daemon("postfix", &["-c", &d("postfix"), "start"], dir);
        wait_for("the stock Postfix banner", Duration::from_secs(30), || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", smtp)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let mut b = [0u8; 3];
            std::io::Read::read_exact(&mut s, &mut b).ok()?;
            (&b == b"220").then_some(())
        });
        Self { root, smtp }
    }
}

impl Drop for Stock {
    fn drop(&mut self) {
        let d = |p: &str| self.root.path().join(p).display().to_string();
        let _ = Command::new("postfix")
            .args(["-c", &d("postfix"), "stop"])
            .status();
        let _ = Command::new("doveadm")
            .args(["-c", &d("dovecot.conf"), "stop"])
            .status();
    }
}

/// Starts a daemon that forks into the background. Its output goes to a file: a pipe would be held open
/// by the daemon and never reach end-of-file.
fn daemon(program: &str, args: &[&str], dir: &Path) {
    let log = std::fs::File::create(dir.join(format!("{program}.start.log"))).unwrap();
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        status.success(),
        "{program} {args:?} failed; see {}",
        dir.display()
    );
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
