//! Runs the comparison: a signer in this process (the e2e crate's
//! `LocalSigner`) issues the two workloads' certificates through the e2e
//! agent (SDS files, as istio-agent writes them); per configuration and
//! round, a fresh server Envoy and client Envoy, an h2load warm-up, then a
//! measured h2load run with the server's CPU read around it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use meshward_e2e::envoy::agent::{Agent, CaAccess, Workload};
use meshward_e2e::envoy::bootstrap::{INBOUND, InboundApp, OUTBOUND, SidecarBootstrap, Upstream};
use meshward_e2e::envoy::sds::SdsDir;
use meshward_e2e::envoy::wasmplugin::WasmPlugin;
use meshward_e2e::envoy::{Admin, Envoy, envoy_binary};
use meshward_e2e::mesh::LocalSigner;
use serde_json::Value;
use tracing::info;

use super::{
    Authz, CLIENT, EnvoyAuthz, H2load, HCM_STATS, SERVER, SERVER_HOST, Sample, aggregate,
    any_authority, meshward_config, noop_config, rbac_filter, route_direct_response, slots,
    upstream_http2,
};
use crate::config::EnvoyBench;
use crate::filter_cost::Kind;
use crate::report::loadavg;
use crate::signer_proc::process_cpu_times;

/// What the section needs from outside.
#[derive(Debug, Clone)]
pub struct Setup {
    /// meshward's `.wasm`.
    pub filter_wasm: PathBuf,
    /// The empty plugin's `.wasm`.
    pub noop_wasm: PathBuf,
    /// h2load.
    pub h2load: PathBuf,
    /// Where the run's directory goes.
    pub work_dir: PathBuf,
}

/// A configuration answered something other than 2xx: the comparison is
/// void (a policy did not allow the client), so the run fails.
#[derive(Debug)]
pub struct Non2xx(pub String);

impl std::fmt::Display for Non2xx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Non2xx {}

/// Shared by every run.
struct Cx<'a> {
    config: &'a EnvoyBench,
    setup: &'a Setup,
    dir: PathBuf,
    server_sds: SdsDir,
    client_sds: SdsDir,
    server_id: String,
    http_plugin: WasmPlugin,
    network_plugin: WasmPlugin,
    pins: Option<Pins>,
}

/// Which CPUs the server Envoy and the load (client Envoy, h2load) run on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pins {
    pub server: String,
    pub load: String,
}

impl Pins {
    /// The last CPU this process may use for the server, the others for
    /// the load; `None` with fewer than 2.
    fn from_allowed() -> anyhow::Result<Option<Self>> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .context("/proc/self/status has no Cpus_allowed_list")?;
        let cpus = parse_cpu_list(list.trim())?;
        Ok(match cpus.split_last() {
            Some((server, load)) if !load.is_empty() => Some(Self {
                server: server.to_string(),
                load: load
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            }),
            _ => None,
        })
    }
}

/// `0-3,6,8-9` (the kernel's CPU list format) as CPU numbers.
pub fn parse_cpu_list(list: &str) -> anyhow::Result<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (from, to) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>()?, b.parse::<u32>()?),
            None => (part.parse::<u32>()?, part.parse::<u32>()?),
        };
        anyhow::ensure!(from <= to, "CPU list {list:?}: range {part}");
        cpus.extend(from..=to);
    }
    Ok(cpus)
}

/// Moves every thread of `pid` onto `cpus` (`taskset -a -p`).
async fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let out = tokio::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdin(Stdio::null())
        .output()
        .await
        .context("running taskset (util-linux)")?;
    anyhow::ensure!(
        out.status.success(),
        "taskset -a -p -c {cpus} {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Measures every configuration `config.rounds` times, interleaved.
pub async fn measure(config: &EnvoyBench, setup: &Setup) -> anyhow::Result<EnvoyAuthz> {
    let envoy_version = version_of(&envoy_binary()?, "--version").await?;
    let h2load_version = version_of(&setup.h2load, "--version")
        .await
        .context("h2load (Debian's nghttp2-client; scripts/bench installs it)")?;
    let noop_wasm_size = std::fs::metadata(&setup.noop_wasm)
        .with_context(|| {
            format!(
                "the empty plugin {} (scripts/bench builds it)",
                setup.noop_wasm.display()
            )
        })?
        .len();
    std::fs::metadata(&setup.filter_wasm)
        .with_context(|| format!("the filter {}", setup.filter_wasm.display()))?;
    let loadavg_start = loadavg();
    let tmp = tempfile::Builder::new()
        .prefix("meshward-envoy-bench-")
        .tempdir_in(&setup.work_dir)?;
    let dir = tmp.path().to_path_buf();
    let mut signer =
        LocalSigner::start(&dir.join("signer"), Duration::from_secs(24 * 3600)).await?;
    let ca = CaAccess {
        grpc: signer.grpc_addr()?,
        roots_pem: signer.roots_pem()?,
        tokens: signer.tokens(),
    };
    let server_sds = SdsDir::create(&dir.join("server-sds"))?;
    let client_sds = SdsDir::create(&dir.join("client-sds"))?;
    let server_agent =
        Agent::start(Workload::new(SERVER.0, SERVER.1), &ca, server_sds.clone()).await?;
    let client_agent =
        Agent::start(Workload::new(CLIENT.0, CLIENT.1), &ca, client_sds.clone()).await?;
    let cx = Cx {
        config,
        setup,
        dir: dir.clone(),
        server_sds,
        client_sds,
        server_id: server_agent.spiffe_id(),
        http_plugin: WasmPlugin::manifest("wasmplugin-http.yaml")?,
        network_plugin: WasmPlugin::manifest("wasmplugin-network.yaml")?,
        pins: if config.pin {
            Pins::from_allowed()?
        } else {
            None
        },
    };
    info!(pins = ?cx.pins, "envoy authz: CPUs");
    info!(client = %client_agent.spiffe_id(), server = %cx.server_id, envoy = %envoy_version, "envoy authz: certificates issued");
    let slots = slots(&config.rules);
    let mut samples = Vec::new();
    for round in 1..=config.rounds {
        for kind in Kind::ALL {
            let authzs: Vec<Authz> = slots
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|&(_, a)| a)
                .collect();
            for (kind, authz, s) in round_of(&cx, kind, &authzs, round).await? {
                info!(
                    round,
                    ?kind,
                    authz = authz.tag(),
                    requests_per_s = format!("{:.0}", s.requests_per_s),
                    cpu_us = format!("{:.1}", s.cpu_us),
                    units = s.units,
                    paced = ?s.paced_rate,
                    handshakes = s.handshakes,
                    resumed = s.resumed,
                    "envoy authz"
                );
                samples.push((kind, authz, s));
            }
        }
    }
    drop(client_agent);
    drop(server_agent);
    signer.stop().await?;
    Ok(EnvoyAuthz {
        envoy_version,
        h2load_version,
        noop_wasm_size,
        loadavg_start,
        loadavg_end: loadavg(),
        pins: cx.pins.clone(),
        rows: aggregate(&slots, &samples),
    })
}

async fn version_of(binary: &Path, arg: &str) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(binary)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} {arg}", binary.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} {arg}: {}",
        binary.display(),
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim()
        .to_string())
}

fn authz_filter(cx: &Cx<'_>, kind: Kind, authz: Authz) -> anyhow::Result<Option<Value>> {
    let plugin = match kind {
        Kind::Http => &cx.http_plugin,
        Kind::Network => &cx.network_plugin,
    };
    Ok(match authz {
        Authz::None => None,
        Authz::Rbac(n) => Some(rbac_filter(kind, n)),
        Authz::Meshward(n) => Some(
            plugin
                .clone()
                .with_plugin_config(meshward_config(kind, n))
                .envoy_filter(&cx.setup.filter_wasm)?,
        ),
        Authz::Noop => Some(
            plugin
                .clone()
                .with_plugin_config(noop_config(kind))
                .envoy_filter(&cx.setup.noop_wasm)?,
        ),
    })
}

fn bootstrap(name: &str, sds: &SdsDir) -> SidecarBootstrap {
    SidecarBootstrap {
        name: name.to_string(),
        namespace: SERVER.0.to_string(),
        labels: [("app".to_string(), name.to_string())].into(),
        sds: sds.clone(),
        inbound: None,
        permissive: false,
        http_filters: Vec::new(),
        network_filters: Vec::new(),
        upstreams: Vec::new(),
        signer_admin: None,
        stats_config: None,
        tcp_early_data_bytes: None,
    }
}

/// Server-side counters the figures divide by.
#[derive(Debug, Clone, Copy)]
struct Counters {
    completed: u64,
    ok: u64,
    connections: u64,
    /// Downstream TLS handshakes on the listeners, and how many resumed a
    /// session.
    handshakes: u64,
    resumed: u64,
}

impl Counters {
    async fn read(admin: &Admin) -> anyhow::Result<Self> {
        let stats = admin.stats().await?;
        let get = |name: &str| {
            let full = format!("{HCM_STATS}{name}");
            stats
                .iter()
                .find(|(k, _)| *k == full)
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let listeners = |suffix: &str| {
            stats
                .iter()
                .filter(|(k, _)| k.starts_with("listener.") && k.ends_with(suffix))
                .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
                .sum::<u64>()
        };
        Ok(Self {
            completed: get("downstream_rq_completed"),
            ok: get("downstream_rq_2xx"),
            connections: get("downstream_cx_total"),
            handshakes: listeners(".ssl.handshake"),
            resumed: listeners(".ssl.session_reused"),
        })
    }
}

/// The server Envoy's CPU time so far: the sum of its threads' time on a
/// CPU from `/proc/<pid>/task/*/schedstat` (nanoseconds, where the 10 ms
/// ticks of `/proc/<pid>/stat` would be 1 µs per request over 10 000
/// requests); `/proc/<pid>/stat` when the kernel has no schedstat. Envoy's
/// threads live as long as the process, so no thread's time drops out.
fn server_cpu(pid: u32) -> anyhow::Result<Duration> {
    match threads_run_time(pid) {
        Some(ns) => Ok(Duration::from_nanos(ns)),
        None => Ok(process_cpu_times(&format!("/proc/{pid}/stat"))?.total()),
    }
}

fn threads_run_time(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let text = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += schedstat_run_ns(&text)?;
    }
    Some(total)
}

/// The first field of a `schedstat` line: time on a CPU, in nanoseconds.
fn schedstat_run_ns(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Waits until the server Envoy uses under a tenth of a core (what a run
/// left queued has been served), at most a minute.
async fn wait_idle(pid: u32) -> anyhow::Result<()> {
    const STEP: Duration = Duration::from_millis(200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut before = server_cpu(pid)?;
    loop {
        tokio::time::sleep(STEP).await;
        let now = server_cpu(pid)?;
        if now.saturating_sub(before) <= STEP / 10 {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the server Envoy stayed busy for a minute after the load stopped"
        );
        before = now;
    }
}

async fn h2load(cx: &Cx<'_>, url: &str, amount: &[String]) -> anyhow::Result<H2load> {
    h2load_wait(h2load_spawn(cx, url, amount)?, url, amount).await
}

/// Starts h2load (on the load's CPUs when pinned); [`h2load_wait`] reads it.
fn h2load_spawn(
    cx: &Cx<'_>,
    url: &str,
    amount: &[String],
) -> anyhow::Result<tokio::process::Child> {
    let mut cmd = match &cx.pins {
        Some(pins) => {
            let mut cmd = tokio::process::Command::new("taskset");
            cmd.args(["-c", &pins.load]).arg(&cx.setup.h2load);
            cmd
        }
        None => tokio::process::Command::new(&cx.setup.h2load),
    };
    cmd.args(["-c", &cx.config.clients.to_string()])
        .args(["-m", &cx.config.streams.to_string()])
        .args(["-t", "1"])
        .args(amount)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {}", cx.setup.h2load.display()))
}

/// Waits for an h2load started by [`h2load_spawn`] and parses its summary.
async fn h2load_wait(
    child: tokio::process::Child,
    url: &str,
    amount: &[String],
) -> anyhow::Result<H2load> {
    let out = child.wait_with_output().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "h2load {amount:?} {url}: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    H2load::parse(&text)
}

/// One configuration's server and client Envoy, started and warmed up.
struct Running {
    kind: Kind,
    authz: Authz,
    what: String,
    server: Envoy,
    client: Envoy,
    url: String,
    pid: u32,
    /// The warm-up's rate (requests/s).
    warm_rate: f64,
}

/// Starts `authz`'s server and client Envoy and warms them up.
async fn start(cx: &Cx<'_>, kind: Kind, authz: Authz, round: usize) -> anyhow::Result<Running> {
    let run_dir = cx.dir.join(format!("r{round}-{kind:?}-{}", authz.tag()));
    let filter = authz_filter(cx, kind, authz)?;
    let mut server = bootstrap(SERVER.1, &cx.server_sds);
    // The app address is replaced by a direct_response below.
    server.inbound = Some(InboundApp::Http(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        9,
    ))));
    match kind {
        Kind::Http => server.http_filters.extend(filter),
        Kind::Network => server.network_filters.extend(filter),
    }
    let mut server = server.build()?;
    route_direct_response(&mut server)?;
    let server = Envoy::start(
        &format!("{}.{}", SERVER.1, SERVER.0),
        &run_dir.join("server"),
        &server,
    )
    .await?;
    let mut client = bootstrap(CLIENT.1, &cx.client_sds);
    client.upstreams.push(Upstream {
        host: SERVER_HOST.to_string(),
        addr: server.listener_addr(INBOUND).await?,
        spiffe_id: cx.server_id.clone(),
        tcp: false,
        handshake_per_request: kind == Kind::Network,
    });
    let mut client = client.build()?;
    any_authority(&mut client)?;
    if kind == Kind::Http {
        upstream_http2(&mut client)?;
    }
    let client = Envoy::start(
        &format!("{}.{}", CLIENT.1, CLIENT.0),
        &run_dir.join("client"),
        &client,
    )
    .await?;
    let url = format!("http://{}/", client.listener_addr(OUTBOUND).await?);
    let pid = server.pid().context("the server Envoy has no PID")?;
    if let Some(pins) = &cx.pins {
        pin(pid, &pins.server).await?;
        pin(
            client.pid().context("the client Envoy has no PID")?,
            &pins.load,
        )
        .await?;
    }
    let what = format!(
        "{} ({kind:?}, {} rules)",
        authz.label(),
        authz.rules().unwrap_or(0)
    );
    let in_flight = (cx.config.clients * cx.config.streams) as u64;
    let mut warm = h2load(
        cx,
        &url,
        &[
            "-D".to_string(),
            cx.config.warmup.as_secs().max(1).to_string(),
        ],
    )
    .await?;
    if warm.status_2xx + warm.status_other == 0 {
        // Slower than the warm-up (RBAC with 10 000 policies): no answer
        // came back in time. Warm up with one request per stream instead,
        // waiting for every answer, which also gives the rate.
        wait_idle(pid).await?;
        warm = h2load(cx, &url, &["-n".to_string(), in_flight.to_string()]).await?;
    }
    if warm.status_other > 0 || warm.status_2xx == 0 {
        return Err(Non2xx(format!(
            "{what} answered {} non-2xx and {} 2xx responses in the warm-up; server log:\n{}",
            warm.status_other,
            warm.status_2xx,
            server.log_tail(20)
        ))
        .into());
    }
    Ok(Running {
        kind,
        authz,
        what,
        server,
        client,
        url,
        pid,
        warm_rate: warm.requests_per_s,
    })
}

/// The fixed rate each configuration of `kind` is measured at together
/// with the others (0: each alone, closed loop).
fn shared_rate(cx: &Cx<'_>, kind: Kind) -> u64 {
    match kind {
        Kind::Http => cx.config.http_rate,
        Kind::Network => cx.config.network_rate,
    }
}

/// Whether `r` keeps up with the shared rate (with room to spare), so that
/// it is measured with the others at that rate rather than alone.
fn sustains(cx: &Cx<'_>, r: &Running) -> bool {
    let rate = shared_rate(cx, r.kind);
    rate / cx.config.clients as u64 > 0 && r.warm_rate > 1.25 * rate as f64
}

/// What a measured run starts from.
struct Before {
    counters: Counters,
    cpu: Duration,
    loadavg: String,
}

/// Measures every configuration of `group` at once: each under its own
/// h2load at the shared rate (`paced`), or one closed-loop h2load (a group
/// of one, `!paced`). The server CPUs are read around the same interval, so
/// a change in the machine's speed during it (other work, the host of this
/// VM) moves every configuration's figure alike, and the marginals over
/// "none" — measured in the same interval — cancel it.
async fn measure_together(
    cx: &Cx<'_>,
    group: &[&Running],
    paced: bool,
    round: usize,
) -> anyhow::Result<Vec<Sample>> {
    let in_flight = (cx.config.clients * cx.config.streams) as u64;
    let mut plans = Vec::new();
    for r in group {
        wait_idle(r.pid).await?;
        let rate = shared_rate(cx, r.kind);
        let per_client = rate / cx.config.clients as u64;
        let requests = if paced {
            (rate as f64 * cx.config.window.as_secs_f64()) as u64
        } else {
            (r.warm_rate * cx.config.window.as_secs_f64()) as u64
        }
        .max(cx.config.min_requests)
        .max(in_flight);
        let mut amount = vec!["-n".to_string(), requests.to_string()];
        if paced {
            amount.extend(["--rps".to_string(), per_client.to_string()]);
        }
        plans.push((
            requests,
            amount,
            paced.then_some(per_client * cx.config.clients as u64),
        ));
    }
    let loadavg = loadavg()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_string();
    let mut befores = Vec::new();
    for r in group {
        befores.push(Before {
            counters: Counters::read(r.server.admin()).await?,
            cpu: server_cpu(r.pid)?,
            loadavg: loadavg.clone(),
        });
    }
    // Every h2load starts before any is waited for: they run at once.
    let mut children = Vec::new();
    for (r, (_, amount, _)) in group.iter().zip(&plans) {
        children.push(h2load_spawn(cx, &r.url, amount)?);
    }
    let mut runs = Vec::new();
    for ((r, (_, amount, _)), child) in group.iter().zip(&plans).zip(children) {
        runs.push(h2load_wait(child, &r.url, amount).await);
    }
    let mut samples = Vec::new();
    for (((r, before), (requests, _, paced_rate)), run) in
        group.iter().zip(befores).zip(plans).zip(runs)
    {
        let run = run?;
        wait_idle(r.pid).await?;
        let cpu = server_cpu(r.pid)?.saturating_sub(before.cpu);
        let after = Counters::read(r.server.admin()).await?;
        let completed = after.completed.saturating_sub(before.counters.completed);
        let ok = after.ok.saturating_sub(before.counters.ok);
        let what = &r.what;
        if run.status_2xx != requests
            || run.status_other > 0
            || run.failed + run.errored + run.timeout > 0
            || ok != completed
        {
            return Err(Non2xx(format!(
                "{what}: h2load sent {requests}: {} 2xx, {} other statuses, {} failed, {} errored, \
                 {} timed out; the server answered {ok} 2xx of {completed}; server log:\n{}",
                run.status_2xx,
                run.status_other,
                run.failed,
                run.errored,
                run.timeout,
                r.server.log_tail(20)
            ))
            .into());
        }
        let units = match r.kind {
            Kind::Http => completed,
            Kind::Network => after
                .connections
                .saturating_sub(before.counters.connections),
        };
        anyhow::ensure!(units > 0, "{what}: the server counted nothing");
        samples.push(Sample {
            round,
            requests_per_s: run.requests_per_s,
            cpu_us: cpu.as_secs_f64() * 1e6 / units as f64,
            units,
            cpu_s: cpu.as_secs_f64(),
            loadavg: before.loadavg,
            paced_rate,
            handshakes: after.handshakes.saturating_sub(before.counters.handshakes),
            resumed: after.resumed.saturating_sub(before.counters.resumed),
        });
    }
    Ok(samples)
}

/// One round of one kind: every configuration started and warmed up, those
/// that sustain the shared rate measured together at it, the others (RBAC
/// with many policies) each alone, closed loop.
async fn round_of(
    cx: &Cx<'_>,
    kind: Kind,
    authzs: &[Authz],
    round: usize,
) -> anyhow::Result<Vec<(Kind, Authz, Sample)>> {
    let mut running = Vec::new();
    for &authz in authzs {
        running.push(
            start(cx, kind, authz, round)
                .await
                .with_context(|| format!("{kind:?} {} round {round}", authz.tag()))?,
        );
    }
    let (together, alone): (Vec<&Running>, Vec<&Running>) =
        running.iter().partition(|r| sustains(cx, r));
    let mut out = Vec::new();
    if !together.is_empty() {
        let samples = measure_together(cx, &together, true, round)
            .await
            .with_context(|| format!("{kind:?} round {round}, measured together"))?;
        out.extend(
            together
                .iter()
                .zip(samples)
                .map(|(r, s)| (r.kind, r.authz, s)),
        );
    }
    for r in alone {
        let samples = measure_together(cx, &[r], false, round)
            .await
            .with_context(|| format!("{kind:?} {} round {round}", r.authz.tag()))?;
        out.extend(samples.into_iter().map(|s| (r.kind, r.authz, s)));
    }
    for r in running {
        r.client.stop().await?;
        r.server.stop().await?;
    }
    // In the order of `authzs`, as the report lists them.
    out.sort_by_key(|(_, authz, _)| authzs.iter().position(|a| a == authz));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{parse_cpu_list, schedstat_run_ns};

    #[test]
    fn schedstat_gives_the_run_time_in_nanoseconds() {
        assert_eq!(schedstat_run_ns("411460 5118 2\n"), Some(411_460));
        assert_eq!(schedstat_run_ns(""), None);
        assert_eq!(schedstat_run_ns("x 1 2"), None);
    }

    #[test]
    fn kernel_cpu_lists_are_read_as_cpu_numbers() {
        assert_eq!(parse_cpu_list("0-1").unwrap(), vec![0, 1]);
        assert_eq!(parse_cpu_list("0-2,5,7-8").unwrap(), vec![0, 1, 2, 5, 7, 8]);
        assert_eq!(parse_cpu_list("3").unwrap(), vec![3]);
        assert!(parse_cpu_list("2-1").is_err());
        assert!(parse_cpu_list("x").is_err());
    }
}
