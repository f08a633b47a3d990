// throwaway: profile the wasm HTTP decision only. Not committed.
use meshward_e2e::host::{Plugin, Properties};
use std::time::Instant;
fn main() {
    let wasm = std::fs::read(std::env::var("W").unwrap()).unwrap();
    let mut list = Vec::new();
    for i in 0..999 { list.push(format!(r#"{{"name":"allow-{i}","action":"ALLOW","from":[{{"principals":["cluster.local/ns/app-{i}/sa/web"]}}],"to":[{{"paths":["/v1/*"],"methods":["GET","POST"]}}],"when":{{"maxCertAge":"24h"}}}}"#)); }
    list.push(r#"{"name":"target","action":"ALLOW","from":[{"principals":["cluster.local/ns/shop/sa/web"]}],"to":[{"paths":["/v1/*"]}]}"#.to_string());
    let json = format!(r#"{{"filterType":"http","rules":[{}]}}"#, list.join(","));
    let mut plugin = Plugin::load(&wasm, &json).unwrap();
    let mut p = Properties::new();
    p.set_int("connection.id", 1).set_str("source.address", "10.0.0.1:40000").set_int("source.port", 40_000)
        .set_str("destination.address", "10.0.0.2:8080").set_int("destination.port", 8080)
        .set_bool("connection.mtls", true).set_str("connection.tls_version", "TLSv1.3")
        .set_str("connection.uri_san_peer_certificate", "spiffe://cluster.local/ns/shop/sa/web");
    let headers: Vec<(String, String)> = [(":method", "GET"), (":path", "/v1/cart?x=1"), (":authority", "shop.example"), (":scheme", "https"), ("user-agent", "meshward-bench"), ("accept", "*/*"), ("x-request-id", "6f1f3bc2-1d5a-4a3e-9a53-0c1b8e2b7a11")].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let secs: f64 = std::env::var("SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let mode = std::env::var("MODE").unwrap_or_default();
    let start = Instant::now();
    let mut n = 0u64; let mut in_cb = 0u128;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..1000 {
            let ctx = plugin.begin_http_request(&p, &headers, b"").unwrap();
            let t = Instant::now();
            let a = plugin.request_headers(ctx, true).unwrap();
            in_cb += t.elapsed().as_nanos();
            std::hint::black_box(a);
            if mode != "leak" { plugin.finish(ctx).unwrap(); }
            n += 1;
        }
    }
    println!("{n} iterations, callback mean {:.1} ns", in_cb as f64 / n as f64);
}
