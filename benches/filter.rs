//! What inbound filtering costs mx, measured in one run: two identical sites (mx agent -> store agent), one
//! whose mx passes every message through rspamd (with its Redis and clamd scanning every text part, as
//! `spec.filtering` renders them; greylisting off, since a benchmark sender never retries), one without.
//! Not part of `cargo test`; run as root with mail-image/packages.txt installed:
//!
//! ```text
//! cargo bench --bench filter -- [--messages 1000] [--concurrency 10] [--size 4096] [--latency 200]
//! ```
//!
//! - added latency: one SMTP session at a time, the client's wait from the end of DATA to the 250
//!   (where the milter's scan happens), p50 and p99, with and without the filter;
//! - throughput: `smtp-source` with `--concurrency` sessions, messages / (start -> the last message's file
//!   in the Maildir), and the ratio filtered / unfiltered.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mailpod_operator::crd::FilteringSpec;
use mailpod_operator::mailconfig::settings::FilterSettings;
use support::filter::{filter_software_present, Filter};
use support::*;

const BENCH: &str = "bench@example.com";
const DEADLINE: Duration = Duration::from_secs(300);

struct Options {
    messages: usize,
    concurrency: usize,
    size: usize,
    latency: usize,
}

fn options() -> Options {
    let mut o = Options {
        messages: 1000,
        concurrency: 10,
        size: 4096,
        latency: 200,
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
            "--latency" => o.latency = value(),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    o
}

/// One site: a store and an mx, the mx filtered when `filter` is given.
struct Setup {
    name: &'static str,
    _site: Site,
    _store: Agent,
    mx: Agent,
    _filter: Option<Filter>,
    maildir: PathBuf,
}

fn setup(name: &'static str, filtered: bool) -> Setup {
    let mut site = Site::new(10_000_000);
    let ps = Ports::free();
    site.lun(0, &ps);
    site.mailbox(BENCH, 0, "pw");
    site.publish();
    let filter = filtered.then(|| {
        let spec: FilteringSpec = serde_yaml::from_str("greylistScore: 0").unwrap();
        Filter::start(&site, &spec)
    });
    if let Some(f) = &filter {
        site.settings.filter = Some(FilterSettings {
            milter: f.ep.milter.clone(),
            timeout_seconds: 30,
            tempfail_when_down: true,
        });
        std::fs::write(
            site.config_dir().join("settings.yaml"),
            site.settings.to_yaml(),
        )
        .unwrap();
    }
    let store = Agent::start(&site, "store", "store", &ps);
    let mx = Agent::start(&site, "mx", "mx", &Ports::free());
    let maildir = store.work.join("mail/example.com/bench/Maildir");
    Setup {
        name,
        _site: site,
        _store: store,
        mx,
        _filter: filter,
        maildir,
    }
}

fn main() {
    if !filter_software_present("filter benchmark") {
        return;
    }
    let smtp_source = ["/usr/sbin/smtp-source", "/usr/bin/smtp-source"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("smtp-source (ships with Debian's postfix package)");
    let o = options();
    let setups = [
        setup("mx without filtering", false),
        setup("mx with rspamd + clamd", true),
    ];

    let mut rows = vec![];
    for s in &setups {
        // Warm-up: the first scans load rspamd's maps and postscreen's first-contact wait.
        for i in 0..20 {
            one_message(s.mx.ports.smtp, &format!("warm {i}"), o.size);
        }
        let mut waits: Vec<f64> = (0..o.latency)
            .map(|i| one_message(s.mx.ports.smtp, &format!("latency {i}"), o.size))
            .collect();
        waits.sort_by(f64::total_cmp);
        let pct = |p: f64| waits[((waits.len() - 1) as f64 * p).round() as usize];
        let already = 20 + o.latency;
        wait_count(&s.maildir, already, s.name);
        let start = Instant::now();
        send(
            smtp_source,
            s.mx.ports.smtp,
            o.messages,
            o.concurrency,
            o.size,
        );
        wait_count(&s.maildir, already + o.messages, s.name);
        let per_second = o.messages as f64 / start.elapsed().as_secs_f64();
        eprintln!("{}: {per_second:.0} messages/s", s.name);
        rows.push((s.name, pct(0.5), pct(0.99), per_second));
    }
    println!(
        "\n{} messages, {} bytes, {} concurrent SMTP sessions; latency over {} sequential messages; nproc {}\n",
        o.messages,
        o.size,
        o.concurrency,
        o.latency,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| setup | end of DATA -> 250, p50 | p99 | messages/s |");
    println!("|-------|------------------------:|----:|-----------:|");
    for (name, p50, p99, rate) in &rows {
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {rate:.0} |",
            p50 * 1e3,
            p99 * 1e3
        );
    }
    let (plain, filtered) = (&rows[0], &rows[1]);
    println!(
        "\nadded by the filter: p50 {:.1} ms, p99 {:.1} ms; throughput filtered / unfiltered {:.2}",
        (filtered.1 - plain.1) * 1e3,
        (filtered.2 - plain.2) * 1e3,
        filtered.3 / plain.3
    );
}

/// One message in its own session; seconds from the end of DATA to the server's 250.
fn one_message(port: u16, subject: &str, size: usize) -> f64 {
    let mut s = Session::connect(port);
    let (code, text) = s.smtp_reply();
    assert_eq!(code, 220, "{text}");
    for (command, want) in [
        ("EHLO client.test".to_string(), 250),
        ("MAIL FROM:<load@remote.test>".to_string(), 250),
        (format!("RCPT TO:<{BENCH}>"), 250),
        ("DATA".to_string(), 354),
    ] {
        let (code, text) = s.smtp(&command);
        assert_eq!(code, want, "{command}: {text}");
    }
    s.send(&message("load@remote.test", &[BENCH], subject, size));
    let start = Instant::now();
    let (code, text) = s.smtp(".");
    let wait = start.elapsed().as_secs_f64();
    assert_eq!(code, 250, "{subject}: {text}");
    let _ = s.smtp("QUIT");
    wait
}

fn send(smtp_source: &str, port: u16, n: usize, concurrency: usize, size: usize) {
    let mut child = Command::new(smtp_source)
        .args(["-s", &concurrency.to_string(), "-m", &n.to_string()])
        .args([
            "-l",
            &size.to_string(),
            "-f",
            "load@remote.test",
            "-t",
            BENCH,
        ])
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
