//! Operator benchmark: N MailPods with M mailboxes each converged by the real controller against the
//! in-memory Kubernetes API, then one direct steady-state pass over all of them.
//!
//! `cargo run --release --bin bench-operator -- --mailpods 1000 --mailboxes 2500`
//!
//! Reports wall and CPU time to convergence, reconciles per second, API requests per reconcile, mutating
//! requests in the steady-state pass (target 0) and peak resident memory (VmHWM). The in-memory API server
//! runs in the same process, so memory and CPU include it (it stores every object as JSON).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use mailpod_operator::controller::{mailpod, run_mailpods, Context, RunConfig};
use mailpod_operator::crd::MailPod;
use mailpod_operator::testkit::fixtures;
use mailpod_operator::testkit::ApiServer;

#[derive(Parser)]
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
}

const NS: &str = "bench";

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

fn vm_hwm_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn converged(server: &ApiServer, args: &Args) -> usize {
    server
        .list::<MailPod>(Some(NS))
        .iter()
        .filter(|mp| {
            mp.status.as_ref().is_some_and(|s| {
                s.observed_generation == mp.metadata.generation
                    && s.mailboxes as usize == args.mailboxes
            })
        })
        .count()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = ApiServer::new();
    let client = server.client();

    let setup = Instant::now();
    for i in 0..args.mailpods {
        let name = format!("mp{i:04}");
        fixtures::create_mailpod(&client, NS, &name, &format!("d{i}.example"), args.mailboxes)
            .await;
    }
    let setup_s = setup.elapsed().as_secs_f64();
    let rss_setup = vm_hwm_mib();
    server.clear_requests();

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
        done = converged(&server, &args);
        if done == args.mailpods {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let converge_s = start.elapsed().as_secs_f64();
    let reconciles_at_convergence = ctx.stats.reconciles();
    let converge_cpu = cpu_seconds() - cpu0;
    // Let the follow-up reconciles that status writes trigger finish, then stop.
    let mut last = server.requests().len();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = server.requests().len();
        if now == last {
            break;
        }
        last = now;
    }
    stop.send(()).ok();
    run.await??;
    let log = server.requests();
    let reconciles = ctx.stats.reconciles();
    let watch_requests = log.iter().filter(|r| r.is_watch()).count();
    let api_requests = log.len() - watch_requests;
    let mutating = log.iter().filter(|r| r.is_mutating()).count();

    // Steady state: one direct reconcile of every MailPod; nothing changed, so nothing may be written.
    server.clear_requests();
    let ctx = Arc::new(Context::new(client.clone(), RunConfig::default()));
    let mailpods: Vec<MailPod> = Api::<MailPod>::namespaced(client.clone(), NS)
        .list(&Default::default())
        .await?
        .items;
    let steady_start = Instant::now();
    let cpu1 = cpu_seconds();
    let failures: usize = stream::iter(mailpods)
        .map(|mp| {
            let ctx = ctx.clone();
            async move { mailpod::reconcile(Arc::new(mp), ctx).await.is_err() as usize }
        })
        .buffer_unordered(args.concurrency as usize)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .sum();
    let steady_s = steady_start.elapsed().as_secs_f64();
    let steady_cpu = cpu_seconds() - cpu1;
    let steady_log = server.requests();
    let steady_mutating = steady_log.iter().filter(|r| r.is_mutating()).count();

    let objects = server.object_count();
    let cms = server.list::<ConfigMap>(Some(NS)).len();
    println!(
        "## Operator benchmark: {} MailPods x {} mailboxes",
        args.mailpods, args.mailboxes
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!("| setup (create MailPods and mailbox ConfigMaps) | {setup_s:.1} s |");
    println!("| MailPods converged | {done} / {} |", args.mailpods);
    println!("| convergence wall time | {converge_s:.1} s |");
    println!("| convergence CPU time (operator + in-memory API) | {converge_cpu:.1} s |");
    println!(
        "| reconciles until quiet | {reconciles} ({:.1}/MailPod) |",
        reconciles as f64 / args.mailpods as f64
    );
    println!(
        "| reconciles per second until converged | {:.1} ({reconciles_at_convergence} reconciles) |",
        reconciles_at_convergence as f64 / converge_s
    );
    println!(
        "| API requests (excl. watches) | {api_requests} ({:.1} per reconcile) |",
        api_requests as f64 / reconciles.max(1) as f64
    );
    println!(
        "| mutating requests while converging | {mutating} ({:.1} per MailPod) |",
        mutating as f64 / args.mailpods as f64
    );
    println!("| steady-state pass: wall / CPU | {steady_s:.2} s / {steady_cpu:.2} s |");
    println!(
        "| steady-state pass: requests per reconcile | {:.1} |",
        steady_log.len() as f64 / args.mailpods as f64
    );
    println!("| steady-state pass: mutating requests | {steady_mutating} (failed reconciles: {failures}) |");
    println!("| objects stored | {objects} ({cms} ConfigMaps) |");
    println!("| peak RSS after setup | {rss_setup:.0} MiB |");
    println!("| peak RSS (VmHWM) | {:.0} MiB |", vm_hwm_mib());
    if done < args.mailpods {
        anyhow::bail!("only {done} of {} MailPods converged", args.mailpods);
    }
    if steady_mutating > 0 {
        anyhow::bail!("the steady-state pass made {steady_mutating} mutating requests");
    }
    Ok(())
}
