//! Filter decision cost inside wasm: the real `meshward_filter.wasm` in the
//! e2e crate's proxy-wasm host on wasmtime (Cranelift). One iteration is a
//! whole stream as a proxy drives it: context create → request headers (or
//! new connection) → done / log / delete, with the host's property and
//! header calls — everything the plugin costs per request or connection.

use std::time::Instant;

use anyhow::ensure;
use meshward_e2e::host::{Action, ConnOutcome, HttpOutcome, Plugin, Properties};

use crate::filter_cost::{
    AUTHORITY, Kind, METHOD, PATH, PEER_URI, PORT, Sampling, WasmCost, policy_json,
    time_part_of_iteration, time_per_iteration,
};

/// See the module's comments: the host calls of the plugin's decision, and
/// nothing else.
const ABI_FLOOR_WAT: &str = include_str!("abi_floor.wat");

/// The ABI floor module (`abi_floor.wat`) in the binary format.
pub fn abi_floor_wasm() -> anyhow::Result<Vec<u8>> {
    wat::parse_str(ABI_FLOOR_WAT).map_err(|e| anyhow::anyhow!("abi_floor.wat: {e}"))
}

fn properties() -> Properties {
    let mut p = Properties::new();
    p.set_int("connection.id", 1)
        .set_str("source.address", "10.0.0.1:40000")
        .set_int("source.port", 40_000)
        .set_str("destination.address", format!("10.0.0.2:{PORT}"))
        .set_int("destination.port", i64::from(PORT))
        .set_bool("connection.mtls", true)
        .set_str("connection.tls_version", "TLSv1.3")
        .set_str("connection.uri_san_peer_certificate", PEER_URI);
    p
}

fn headers() -> Vec<(String, String)> {
    [
        (":method", METHOD),
        (":path", PATH),
        (":authority", AUTHORITY),
        (":scheme", "https"),
        ("user-agent", "meshward-bench"),
        ("accept", "*/*"),
        ("x-request-id", "6f1f3bc2-1d5a-4a3e-9a53-0c1b8e2b7a11"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Load the plugin with a policy of `rules` rules of `kind` and time streams.
pub fn measure(
    wasm: &[u8],
    rules: usize,
    kind: Kind,
    sampling: Sampling,
) -> anyhow::Result<WasmCost> {
    let json = policy_json(rules, kind);
    let t = Instant::now();
    let mut plugin =
        Plugin::load(wasm, &json).map_err(|e| anyhow::anyhow!("loading the plugin: {e}"))?;
    let configure_ms = t.elapsed().as_secs_f64() * 1e3;
    let memory_after_configure = plugin.memory_size();
    let props = properties();
    let headers = headers();

    // The peer must be allowed (through the last rule): a deny would time
    // the local-reply path instead.
    let mut first_error: Option<String> = None;
    match kind {
        Kind::Http => {
            let (ctx, outcome) = plugin
                .new_http_request(&props, &headers, b"")
                .map_err(|e| anyhow::anyhow!("first request: {e}"))?;
            ensure!(
                matches!(outcome, HttpOutcome::Continue { .. }),
                "the plugin did not allow the bench request: {outcome:?}"
            );
            plugin.finish(ctx).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Kind::Network => {
            let (ctx, outcome) = plugin
                .new_connection(&props)
                .map_err(|e| anyhow::anyhow!("first connection: {e}"))?;
            ensure!(
                outcome == ConnOutcome::Continue,
                "the plugin did not allow the bench connection: {outcome:?}"
            );
            plugin
                .finish_connection(ctx)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let stream_ns = time_per_iteration(sampling, || {
        let ok = match kind {
            Kind::Http => plugin
                .new_http_request(&props, &headers, b"")
                .and_then(|(ctx, o)| {
                    plugin
                        .finish(ctx)
                        .map(|()| matches!(o, HttpOutcome::Continue { .. }))
                }),
            Kind::Network => plugin.new_connection(&props).and_then(|(ctx, o)| {
                plugin
                    .finish_connection(ctx)
                    .map(|()| o == ConnOutcome::Continue)
            }),
        };
        match ok {
            Ok(allowed) => allowed,
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
                false
            }
        }
    })?;
    if let Some(e) = first_error {
        anyhow::bail!("the plugin failed while being timed: {e}");
    }
    // The decision alone: open the stream (untimed), time the callback where
    // the plugin decides, then close the stream (untimed). Every request on
    // the same connection (`connection.id` fixed): the plugin reads the
    // connection's facts once per connection.
    let decision_ns = time_decision(&mut plugin, kind, sampling, &props, &headers, false)?;
    // HTTP only: every request on a connection of its own, so the plugin
    // reads and decodes the connection's facts each time.
    let decision_new_connection_ns = match kind {
        Kind::Http => Some(time_decision(
            &mut plugin,
            kind,
            sampling,
            &props,
            &headers,
            true,
        )?),
        Kind::Network => None,
    };
    ensure!(
        plugin.open_contexts() <= 1,
        "{} contexts left open",
        plugin.open_contexts()
    );
    // The same callback, host and properties, with a module that only makes
    // the plugin's host calls.
    let mut floor = Plugin::load(&abi_floor_wasm()?, &json)
        .map_err(|e| anyhow::anyhow!("loading the ABI floor module: {e}"))?;
    let abi_floor_ns = time_decision(&mut floor, kind, sampling, &props, &headers, false)?;
    Ok(WasmCost {
        rules,
        kind,
        decision_ns,
        decision_new_connection_ns,
        abi_floor_ns,
        stream_ns,
        memory_after_configure,
        configure_ms,
        decision_round_p50_ns: vec![decision_ns.p50],
        abi_floor_round_p50_ns: vec![abi_floor_ns.p50],
    })
}

/// Times the decision callback alone; with `new_connection`, each stream
/// gets a `connection.id` of its own.
fn time_decision(
    plugin: &mut Plugin,
    kind: Kind,
    sampling: Sampling,
    props: &Properties,
    headers: &[(String, String)],
    new_connection: bool,
) -> anyhow::Result<crate::stats::Summary> {
    let mut first_error: Option<String> = None;
    let mut props = props.clone();
    let mut next_id: i64 = 1_000;
    let timed = time_part_of_iteration(sampling, || {
        if new_connection {
            next_id += 1;
            props.set_int("connection.id", next_id);
        }
        let timed = match kind {
            Kind::Http => plugin
                .begin_http_request(&props, headers, b"")
                .and_then(|ctx| {
                    let t = Instant::now();
                    let action = plugin.request_headers(ctx, true);
                    let ns = t.elapsed().as_nanos();
                    let action = action?;
                    plugin.finish(ctx)?;
                    Ok((action, ns))
                }),
            Kind::Network => plugin.begin_connection(&props).and_then(|ctx| {
                let t = Instant::now();
                let action = plugin.connection_opened(ctx);
                let ns = t.elapsed().as_nanos();
                let action = action?;
                plugin.finish_connection(ctx)?;
                Ok((action, ns))
            }),
        };
        match timed {
            Ok((Action::Continue, ns)) => Some(u64::try_from(ns).unwrap_or(u64::MAX)),
            Ok((other, _)) => {
                first_error.get_or_insert_with(|| format!("the plugin answered {other:?}"));
                None
            }
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
                None
            }
        }
    });
    if let Some(e) = first_error {
        anyhow::bail!("the plugin failed while its decision was timed: {e}");
    }
    timed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The floor module loads in the host and lets the bench's request and
    /// connection through, so its timing measures the callback it should.
    #[test]
    fn abi_floor_module_continues_requests_and_connections() {
        let wasm = abi_floor_wasm().unwrap();
        let mut floor = Plugin::load(&wasm, "{}").unwrap();
        let props = properties();
        let (ctx, outcome) = floor.new_http_request(&props, &headers(), b"").unwrap();
        assert!(
            matches!(outcome, HttpOutcome::Continue { .. }),
            "{outcome:?}"
        );
        floor.finish(ctx).unwrap();
        let (ctx, outcome) = floor.new_connection(&props).unwrap();
        assert_eq!(outcome, ConnOutcome::Continue);
        floor.finish_connection(ctx).unwrap();
        assert!(!floor.has_failed());
        // Both decisions counted, through metric ids defined at configure.
        let text = floor.metrics_prometheus();
        assert!(text.contains("meshward_abi_floor_decisions 2"), "{text}");
        assert!(text.contains("meshward_abi_floor_cert_unknown 2"), "{text}");
    }
}
