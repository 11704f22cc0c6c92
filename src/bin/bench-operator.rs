//! Operator benchmark: N MailPods with M mailboxes each converged by the real MailPod controller against
//! the in-memory Kubernetes API, served over HTTP by a second process, so the figures of this process are
//! the operator's own; then a steady-state pass (every MailPod reconciled again with nothing to change).
//!
//! `cargo run --release --features testkit --bin bench-operator -- --mailpods 1000 --mailboxes 2500`
//!
//! Reports the operator's wall and CPU time to convergence, reconciles per second, API requests per
//! reconcile, the reads and mutating requests of the steady-state pass (targets: at most 1 read per
//! reconcile, 0 writes) and the operator's peak resident memory (VmHWM; the API server's is given apart).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Router;
use clap::Parser;
use http::{Method, Request};
use kube::api::{Api, Patch, PatchParams};
use kube::client::ClientBuilder;
use mailpod_operator::controller::client::{with_timeouts, RequestTimeoutLayer, REQUEST_TIMEOUT};
use mailpod_operator::controller::{run_mailpods, Context, RunConfig};
use mailpod_operator::crd::MailPod;
use mailpod_operator::testkit::fixtures;
use mailpod_operator::testkit::{ApiServer, RequestRecord};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tower::ServiceExt;

#[derive(Parser, Clone)]
struct Args {
    /// MailPods to create.
    #[arg(long, default_value_t = 1000)]
    mailpods: usize,
    /// Mailboxes per MailPod (listed in a ConfigMap each MailPod references).
    #[arg(long, default_value_t = 2500)]
    mailboxes: usize,
    /// MailPods reconciled at once.
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
    /// Give up waiting for convergence after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Run as the in-memory API server process (started by the benchmark itself).
    #[arg(long, hide = true)]
    serve: bool,
}

const NS: &str = "bench";
/// The annotation the steady-state pass sets on every MailPod to have it reconciled again.
const TOUCH: &str = "bench.mailpod.io/touched";

/// (user + system) CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `(comm)` part; utime and stime are fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Linux reports in USER_HZ, 100 on every mainstream architecture.
    (ticks(11) + ticks(12)) / 100.0
}

/// A `/proc/PID/status` figure (`VmHWM`, `VmRSS`) in MiB.
fn memory_mib(pid: &str, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.serve {
        serve(args).await
    } else {
        operate(args).await
    }
}

// ---- the API server process ----

#[derive(Clone)]
struct Served {
    server: ApiServer,
    mailboxes: usize,
}

/// Creates the MailPods and their mailbox ConfigMaps, prints the port, and serves the in-memory API
/// over HTTP, with `/_bench/...` to read its request log and drive the steady-state pass.
async fn serve(args: Args) -> anyhow::Result<()> {
    let server = ApiServer::new();
    let client = server.client();
    let setup = Instant::now();
    for i in 0..args.mailpods {
        let name = format!("mp{i:04}");
        fixtures::create_mailpod(&client, NS, &name, &format!("d{i}.example"), args.mailboxes)
            .await;
    }
    server.clear_requests();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "{} {:.1}",
        listener.local_addr()?.port(),
        setup.elapsed().as_secs_f64()
    );
    let app = Router::new().fallback(answer).with_state(Served {
        server,
        mailboxes: args.mailboxes,
    });
    axum::serve(listener, app).await?;
    Ok(())
}

async fn answer(State(s): State<Served>, req: axum::extract::Request) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    if let Some(what) = parts.uri.path().strip_prefix("/_bench/") {
        let out = control(&s, what).await;
        return axum::response::Response::new(axum::body::Body::from(out.to_string()));
    }
    let req = Request::from_parts(parts, kube::client::Body::from(body.to_vec()));
    match s.server.clone().oneshot(req).await {
        Ok(resp) => resp.map(axum::body::Body::new),
        Err(e) => {
            let mut r = axum::response::Response::new(axum::body::Body::from(e.to_string()));
            *r.status_mut() = http::StatusCode::BAD_GATEWAY;
            r
        }
    }
}

fn is_touch(r: &RequestRecord) -> bool {
    r.method == Method::PATCH && r.path.contains("/mailpods/") && !r.path.ends_with("/status")
}

async fn control(s: &Served, what: &str) -> Value {
    match what {
        "converged" => {
            let done = s
                .server
                .list::<MailPod>(Some(NS))
                .iter()
                .filter(|mp| {
                    mp.status.as_ref().is_some_and(|st| {
                        st.observed_generation == mp.metadata.generation
                            && st.mailboxes as usize == s.mailboxes
                    })
                })
                .count();
            json!(done)
        }
        "clear" => {
            s.server.clear_requests();
            json!(null)
        }
        "touch" => {
            let api: Api<MailPod> = Api::namespaced(s.server.client(), NS);
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
                .to_string();
            let patch = json!({"metadata": {"annotations": {TOUCH: stamp}}});
            for mp in s.server.list::<MailPod>(Some(NS)) {
                let name = mp.metadata.name.unwrap_or_default();
                let _ = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            }
            json!(null)
        }
        "requests" => {
            let log = s.server.requests();
            let count = |f: &dyn Fn(&RequestRecord) -> bool| log.iter().filter(|r| f(r)).count();
            json!({
                "total": log.len(),
                "watches": count(&|r| r.is_watch()),
                "reads": count(&|r| r.method == Method::GET && !r.is_watch()),
                "mutating": count(&|r| r.is_mutating() && !is_touch(r)),
                "touches": count(&is_touch),
                "objects": s.server.object_count(),
                "last": log.iter().rev().take(5).map(|r| format!("{} {}?{} {}", r.method, r.path, r.query, r.status)).collect::<Vec<_>>(),
            })
        }
        _ => json!({"error": "unknown"}),
    }
}

// ---- the operator process ----

async fn bench(client: &kube::Client, what: &str) -> anyhow::Result<Value> {
    let method = if matches!(what, "clear" | "touch") {
        Method::POST
    } else {
        Method::GET
    };
    let req = Request::builder()
        .method(method)
        .uri(format!("/_bench/{what}"))
        .body(vec![])?;
    Ok(serde_json::from_str(&client.request_text(req).await?)?)
}

/// Waits until the API server has seen no request for `quiet`.
async fn wait_quiet(
    client: &kube::Client,
    quiet: Duration,
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut last = bench(client, "requests").await?["total"].clone();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = bench(client, "requests").await?["total"].clone();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return Ok(());
        }
    }
    anyhow::bail!(
        "the operator never went quiet: {}",
        bench(client, "requests").await?
    )
}

async fn operate(args: Args) -> anyhow::Result<()> {
    let mut api_process = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "--serve",
            "--mailpods",
            &args.mailpods.to_string(),
            "--mailboxes",
            &args.mailboxes.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let api_pid = api_process.id().unwrap_or_default().to_string();
    let mut first = String::new();
    tokio::io::BufReader::new(api_process.stdout.take().expect("piped"))
        .read_line(&mut first)
        .await?;
    let (port, setup_s) = first
        .trim()
        .split_once(' ')
        .ok_or_else(|| anyhow::anyhow!("the API server process did not start: {first:?}"))?;
    let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse()?);
    let client = ClientBuilder::try_from(with_timeouts(config))?
        .with_layer(&RequestTimeoutLayer(REQUEST_TIMEOUT))
        .build();
    let rss_start = memory_mib("self", "VmRSS");

    // Convergence with the real Controller.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = RunConfig {
        namespace: Some(NS.into()),
        concurrency: args.concurrency,
        ..RunConfig::default()
    };
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let ctx = Arc::new(Context::new(client.clone(), config));
    let run = tokio::spawn(run_mailpods(ctx.clone(), async {
        let _ = stopped.await;
    }));
    let deadline = start + Duration::from_secs(args.timeout);
    let mut done = 0;
    while Instant::now() < deadline {
        done = bench(&client, "converged").await?.as_u64().unwrap_or(0) as usize;
        if done == args.mailpods {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let converge_s = start.elapsed().as_secs_f64();
    let reconciles_at_convergence = ctx.stats.reconciles();
    let converge_cpu = cpu_seconds() - cpu0;
    if done < args.mailpods {
        anyhow::bail!("only {done} of {} MailPods converged", args.mailpods);
    }
    // The follow-ups (watch events of its own writes, the requeue after a change) end; then quiet.
    wait_quiet(&client, Duration::from_secs(7), deadline).await?;
    let converging = bench(&client, "requests").await?;
    let reconciles = ctx.stats.reconciles();

    // Steady state: every MailPod reconciled again, with nothing to change.
    bench(&client, "clear").await?;
    let r0 = ctx.stats.reconciles();
    let cpu1 = cpu_seconds();
    let steady_start = Instant::now();
    bench(&client, "touch").await?;
    while Instant::now() < deadline && ctx.stats.reconciles() < r0 + args.mailpods as u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_quiet(&client, Duration::from_secs(2), deadline).await?;
    let steady_s = steady_start.elapsed().as_secs_f64();
    let steady_cpu = cpu_seconds() - cpu1;
    let steady = bench(&client, "requests").await?;
    let steady_reconciles = ctx.stats.reconciles() - r0;
    stop.send(()).ok();
    run.await??;

    let peak = memory_mib("self", "VmHWM");
    let api_peak = memory_mib(&api_pid, "VmHWM");
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    let per = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    let api_requests = n(&converging, "total") - n(&converging, "watches");
    let steady_reads = n(&steady, "reads");
    let steady_mutating = n(&steady, "mutating");
    println!(
        "## Operator benchmark: {} MailPods x {} mailboxes",
        args.mailpods, args.mailboxes
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!("| setup in the API server process (MailPods and mailbox ConfigMaps) | {setup_s} s |");
    println!("| MailPods converged | {done} / {} |", args.mailpods);
    println!("| convergence wall time | {converge_s:.1} s |");
    println!("| convergence CPU time (operator only) | {converge_cpu:.1} s |");
    println!(
        "| reconciles until quiet | {reconciles} ({:.1}/MailPod) |",
        per(reconciles, args.mailpods as u64)
    );
    println!(
        "| reconciles per second until converged | {:.1} ({reconciles_at_convergence} reconciles) |",
        reconciles_at_convergence as f64 / converge_s
    );
    println!(
        "| API requests until quiet (excl. watches) | {api_requests} ({:.1} per reconcile; {} watches) |",
        per(api_requests, reconciles),
        n(&converging, "watches")
    );
    println!(
        "| mutating requests until quiet | {} ({:.1} per MailPod) |",
        n(&converging, "mutating"),
        per(n(&converging, "mutating"), args.mailpods as u64)
    );
    println!("| steady-state pass: reconciles | {steady_reconciles} |");
    println!("| steady-state pass: wall / operator CPU | {steady_s:.2} s / {steady_cpu:.2} s |");
    println!(
        "| steady-state pass: API reads per reconcile | {:.2} ({steady_reads} reads) |",
        per(steady_reads, steady_reconciles)
    );
    println!("| steady-state pass: mutating requests | {steady_mutating} |");
    println!("| objects stored | {} |", n(&steady, "objects"));
    println!("| operator RSS before the controller started | {rss_start:.0} MiB |");
    println!("| operator peak RSS (VmHWM) | {peak:.0} MiB |");
    println!("| in-memory API server process peak RSS (not the operator's) | {api_peak:.0} MiB |");
    api_process.kill().await.ok();
    if steady_mutating > 0 {
        anyhow::bail!("the steady-state pass made {steady_mutating} mutating requests");
    }
    Ok(())
}
