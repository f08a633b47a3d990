// The meshward signer dashboard. Reads this replica's /v1/status, /readyz
// and /metrics every REFRESH_MS and renders them. Every value is set with
// textContent: nothing the signer says is ever parsed as markup.
"use strict";

const REFRESH_MS = 5000;
const P = "meshward_signer_";

// What each `requests_total` outcome means to an operator.
const OUTCOMES = {
  issued: "signed, recorded in the ledger, answered",
  invalid_argument: "malformed CSR, SAN, key type or TTL",
  unauthenticated: "no token, or one that does not verify",
  permission_denied: "caller may not have this identity",
  rate_limited: "pod over its issuance rate (policy.rate_limit_*)",
  auth_throttled: "address throttled after failed authentication",
  resource_exhausted: "over server.max_concurrent_requests; agents retry",
  unavailable: "backend unavailable (Vault down or circuit open)",
  internal: "backend or ledger failure; nothing was handed out",
};

// [label, gauge, limit gauge, waits counter, refused counter(s)]
const BOUNDS = [
  ["gRPC connections (15012)", "grpc_connections", "grpc_connections_max",
    "grpc_connection_limit_waits_total", "grpc_connections_refused_per_address_total"],
  ["admin connections", "admin_connections", "admin_connections_max",
    "admin_connection_limit_waits_total", "admin_connections_refused_per_address_total"],
  ["WatchBundle streams", "bundle_watchers", "bundle_watchers_max",
    null, ["bundle_watchers_refused_total", "bundle_watchers_refused_per_address_total"]],
  ["bundle endpoint connections", "bundle_endpoint_connections", "bundle_endpoint_connections_max",
    "bundle_endpoint_connection_limit_waits_total", null],
];

let previous = null; // { t: seconds, m: parsed metrics }

// --- the Prometheus / OpenMetrics text format --------------------------------

function parseLabels(text) {
  const labels = {};
  const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  let m;
  while ((m = re.exec(text)) !== null) {
    labels[m[1]] = m[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
  }
  return labels;
}

function parseMetrics(text) {
  const out = new Map();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const v = m[3] === "+Inf" ? Infinity : m[3] === "-Inf" ? -Infinity : Number(m[3]);
    if (!out.has(m[1])) out.set(m[1], []);
    out.get(m[1]).push({ labels: m[2] ? parseLabels(m[2]) : {}, value: v });
  }
  return out;
}

function samples(m, name) {
  return m.get(P + name) || [];
}

function present(m, name) {
  return m.has(P + name);
}

function total(m, name, keep) {
  let s = 0;
  for (const x of samples(m, name)) if (!keep || keep(x.labels)) s += x.value;
  return s;
}

// Per second since the previous read, or null on the first read.
function rate(m, name, keep, dt) {
  if (!previous || dt <= 0) return null;
  return Math.max(0, total(m, name, keep) - total(previous.m, name, keep)) / dt;
}

// The q-quantile of a histogram's observations since the previous read
// (since start on the first read, or when `sinceStart`), interpolated within its bucket as
// Prometheus' histogram_quantile does. null when nothing was observed.
function quantile(q, m, name, sinceStart) {
  const cumulative = (metrics) => {
    const b = new Map();
    for (const x of samples(metrics, name + "_bucket")) {
      const le = x.labels.le === "+Inf" ? Infinity : Number(x.labels.le);
      b.set(le, (b.get(le) || 0) + x.value);
    }
    return b;
  };
  const now = cumulative(m);
  const before = previous && !sinceStart ? cumulative(previous.m) : new Map();
  const bounds = [...now.keys()].sort((a, b) => a - b);
  const counts = bounds.map((le) => now.get(le) - (before.get(le) || 0));
  const n = counts.length ? counts[counts.length - 1] : 0;
  if (!(n > 0)) return null;
  const rank = q * n;
  for (let i = 0; i < bounds.length; i++) {
    if (counts[i] >= rank) {
      const upper = bounds[i];
      const lower = i === 0 ? 0 : bounds[i - 1];
      const below = i === 0 ? 0 : counts[i - 1];
      if (upper === Infinity) return lower;
      const inBucket = counts[i] - below;
      return inBucket > 0 ? lower + ((upper - lower) * (rank - below)) / inBucket : upper;
    }
  }
  return bounds.length > 1 ? bounds[bounds.length - 2] : null;
}

// --- formatting ----------------------------------------------------------------

function count(n) {
  return n === null || n === undefined || Number.isNaN(n) ? "–" : Math.round(n).toLocaleString("en-US");
}

function perSecond(r) {
  if (r === null) return "–";
  return r >= 100 ? `${Math.round(r)}/s` : r >= 1 ? `${r.toFixed(1)}/s` : `${r.toFixed(2)}/s`;
}

function seconds(s) {
  if (s === null) return "–";
  if (s < 1e-3) return `${(s * 1e6).toFixed(0)} µs`;
  if (s < 1) return `${(s * 1e3).toFixed(1)} ms`;
  return `${s.toFixed(2)} s`;
}

function span(s) {
  const neg = s < 0;
  s = Math.abs(s);
  let text;
  if (s < 120) text = `${Math.round(s)} s`;
  else if (s < 7200) text = `${Math.round(s / 60)} min`;
  else if (s < 172800) text = `${Math.round(s / 3600)} h`;
  else text = `${Math.round(s / 86400)} days`;
  return neg ? `${text} ago` : text;
}

function date(unix) {
  return new Date(unix * 1000).toISOString().replace(".000Z", "Z");
}

// --- DOM -------------------------------------------------------------------------

function byId(id) {
  return document.getElementById(id);
}

function setText(id, text) {
  byId(id).textContent = text;
}

// A table cell holding `content` (a node, or text).
function cell(content, className) {
  const td = document.createElement("td");
  if (content instanceof Node) td.appendChild(content);
  else td.textContent = content;
  if (className) td.className = className;
  return td;
}

function fillTable(id, rows) {
  const body = byId(id).tBodies[0];
  const trs = rows.map((cells) => {
    const tr = document.createElement("tr");
    for (const c of cells) tr.appendChild(c);
    return tr;
  });
  body.replaceChildren(...trs);
}

function meter(value, max) {
  const el = document.createElement("meter");
  el.min = 0;
  el.max = max > 0 ? max : 1;
  el.value = value;
  el.low = el.max * 0.7;
  el.high = el.max * 0.9;
  el.optimum = 0;
  el.title = max > 0 ? `${Math.round((100 * value) / max)}%` : "";
  return el;
}

// --- sections ----------------------------------------------------------------------

function renderStatus(s) {
  setText("trust-domain", s.trust_domain);
  setText("replica", s.replica);
  setText("version", s.version);
  setText("backend", s.backend);
  setText("ledger", s.ledger);
  setText("uptime", span(s.now - s.started_at));
  document.title = `meshward signer · ${s.replica}`;

  const left = s.signing_ca.not_after - s.now;
  setText("ca-expiry", left > 0 ? `in ${span(left)}` : "EXPIRED");
  byId("ca-expiry").className = left < 7 * 86400 ? "big bad" : left < 30 * 86400 ? "big warn" : "big";
  setText("ca-not-after", `notAfter ${date(s.signing_ca.not_after)}`);

  fillTable("roots", s.bundle.roots.map((r) => {
    const fingerprint = document.createElement("code");
    fingerprint.textContent = `${r.sha256.slice(0, 16)}…`;
    fingerprint.title = r.sha256;
    const expires = r.validity ? r.validity.not_after - s.now : null;
    return [
      cell(r.subject, "subject"),
      cell(fingerprint),
      cell(r.validity ? date(r.validity.not_after) : "–"),
      cell(expires === null ? "–" : expires > 0 ? span(expires) : "EXPIRED",
        expires !== null && expires < 30 * 86400 ? "num warn" : "num"),
    ];
  }));

  const roots = s.bundle.roots.length;
  let rotation = `${roots} root${roots === 1 ? "" : "s"} published (bundle sequence ${s.bundle.sequence}). `;
  const r = s.rotation;
  if (s.rotation_error) {
    rotation += `Rotation state unreadable: ${s.rotation_error}`;
  } else if (!r) {
    rotation += `Roots come from the ${s.backend} backend; a root rotation is done there ` +
      "(for cacerts: publish both roots in root-cert.pem before switching the signing CA).";
  } else if (r.phase === "stable") {
    rotation += "No root rotation in progress.";
  } else if (r.phase === "overlap") {
    rotation += `Root rotation: the new root is published since ${date(r.started_at)}; ` +
      `issuance switches to it at ${date(r.switch_at)} (in ${span(r.switch_at - s.now)}).`;
  } else if (r.phase === "draining") {
    rotation += `Root rotation: issuing from the new root since ${date(r.switched_at)}; ` +
      "the old root stays in the bundle until the last certificate it vouches for has expired.";
  } else {
    rotation += `Root rotation phase: ${r.phase}.`;
  }
  setText("rotation", rotation);
}

// A rotation phase in a word or two, for the fleet table.
function phaseWord(r) {
  if (!r) return "–";
  if (r.phase === "overlap") return `overlap, switch ${date(r.switch_at)}`;
  return r.phase;
}

// Every root set, as fingerprint prefixes, so rows can be compared by eye.
function rootList(roots) {
  const code = document.createElement("code");
  code.textContent = roots.map((r) => `${r.slice(0, 12)}…`).join(" ");
  code.title = roots.join("\n");
  return code;
}

function renderFleet(f) {
  const asked = f.replicas.length;
  const notReady = f.replicas.filter((r) => r.ready === false).length;
  setText("fleet-summary",
    `${f.answered} of ${asked} replica${asked === 1 ? "" : "s"} answered` +
    (notReady > 0 ? `, ${notReady} not ready` : "") +
    ` (${f.targets.join(", ")}, read ${date(f.gathered_at)}). ` +
    `Together: ${count(f.totals.issued)} issued, ${count(f.totals.refused)} refused since each started` +
    (f.total_rates ? ` (now ${perSecond(f.total_rates.issued_per_second)} issued, ` +
      `${perSecond(f.total_rates.refused_per_second)} refused)` : "") + "; " +
    `${count(f.totals.grpc_connections)} gRPC connections and ` +
    `${count(f.totals.bundle_watchers)} WatchBundle streams open.`);
  const warnings = [];
  if (!f.roots_agree) {
    warnings.push("Replicas publish different roots: workloads may not trust each other's " +
      "certificates. Compare the roots column; a rotation must reach every replica.");
  }
  if (!f.versions_agree) warnings.push("Replicas run different versions (a rollout in progress?).");
  if (f.answered < asked) warnings.push(`${asked - f.answered} replica(s) did not answer.`);
  if (f.truncated) warnings.push("More replicas resolved than dashboard.fleet_max_replicas; the rest were not asked.");
  for (const e of f.resolve_errors) warnings.push(`Not resolved: ${e}`);
  const w = byId("fleet-warnings");
  w.textContent = warnings.join(" ");
  w.hidden = warnings.length === 0;
  fillTable("fleet-replicas", f.replicas.map((r) => {
    const s = r.status;
    const c = r.counters;
    const name = s ? s.replica + (r.this_replica ? " (this page)" : "") : "–";
    return [
      cell(name),
      cell(r.address),
      cell(r.ready === null ? "–" : r.ready ? "ready" : "NOT READY", r.ready === false ? "bad" : ""),
      cell(s ? s.version : "–"),
      cell(s ? `${s.backend}, ledger ${s.ledger}` : "–"),
      cell(s ? rootList(s.roots) : "–"),
      cell(s ? phaseWord(s.rotation) : "–"),
      cell(c ? count(c.issued) : "–", "num"),
      cell(c ? count(c.refused) : "–", "num"),
      cell(perSecond(r.rates ? r.rates.issued_per_second : null), "num"),
      cell(perSecond(r.rates ? r.rates.refused_per_second : null), "num"),
      cell(c ? count(c.grpc_connections) : "–", "num"),
      cell(c ? count(c.bundle_watchers) : "–", "num"),
      cell(r.error || "", r.error ? "bad" : ""),
    ];
  }));
  byId("fleet").hidden = false;
}

// The sum of the refusal counters `names` (one name or several) present.
function refusedOf(m, names) {
  const found = [].concat(names || []).filter((n) => present(m, n));
  return found.length ? count(found.reduce((sum, n) => sum + total(m, n), 0)) : "–";
}

function renderMetrics(m, dt, ledger) {
  const issued = (l) => l.outcome === "issued";
  const refused = (l) => l.outcome !== "issued";
  setText("issued-total", count(total(m, "requests_total", issued)));
  setText("issued-rate", `${perSecond(rate(m, "requests_total", issued, dt))} now`);
  setText("refused-total", count(total(m, "requests_total", refused)));
  setText("refused-rate", `${perSecond(rate(m, "requests_total", refused, dt))} now`);
  // Idle since the previous read: the figures since start, said so.
  const recentP99 = quantile(0.99, m, "issuance_duration_seconds");
  const recent = recentP99 !== null;
  const p99 = recent ? recentP99 : quantile(0.99, m, "issuance_duration_seconds", true);
  const p50 = quantile(0.5, m, "issuance_duration_seconds", !recent);
  setText("latency-p99", seconds(p99));
  setText("latency-p50", p50 === null ? "nothing issued yet"
    : `p50 ${seconds(p50)}${recent ? "" : " · since start (none since the last read)"}`);

  const outcomes = samples(m, "requests_total")
    .map((x) => x.labels.outcome)
    .filter((o, i, all) => o !== undefined && all.indexOf(o) === i)
    .sort((a, b) => (a === "issued" ? -1 : b === "issued" ? 1 : a.localeCompare(b)));
  fillTable("outcomes", outcomes.map((o) => {
    const only = (l) => l.outcome === o;
    const n = total(m, "requests_total", only);
    const r = rate(m, "requests_total", only, dt);
    const bad = o !== "issued" && r !== null && r > 0;
    return [cell(o), cell(count(n), "num"), cell(perSecond(r), bad ? "num warn" : "num"),
      cell(OUTCOMES[o] || "", "muted")];
  }));

  fillTable("bounds", BOUNDS.filter(([, gauge]) => present(m, gauge)).map(
    ([label, gauge, max, waits, refusedName]) => {
      const used = total(m, gauge);
      const limit = total(m, max);
      return [
        cell(label), cell(count(used), "num"), cell(count(limit), "num"), cell(meter(used, limit)),
        cell(waits && present(m, waits) ? count(total(m, waits)) : "–", "num"),
        cell(refusedOf(m, refusedName), "num"),
      ];
    }));

  const valid = new Map();
  const held = new Map();
  const recorded = new Map();
  const add = (map, name) => {
    for (const x of samples(m, name)) {
      const ns = x.labels.namespace;
      if (ns !== undefined) map.set(ns, (map.get(ns) || 0) + x.value);
    }
  };
  add(valid, "ledger_certificates_valid");
  add(held, "ledger_certificates");
  add(recorded, "ledger_certificates_recorded_total");
  const namespaces = [...new Set([...valid.keys(), ...held.keys(), ...recorded.keys()])]
    .sort((a, b) => (valid.get(b) || 0) - (valid.get(a) || 0) || a.localeCompare(b));
  const validTotal = [...valid.values()].reduce((a, b) => a + b, 0);
  setText("valid-total", ledger === "off" ? "–" : count(validTotal));
  setText("valid-namespaces", ledger === "off" ? "ledger off"
    : `in ${namespaces.length} namespace${namespaces.length === 1 ? "" : "s"} (this replica)`);
  fillTable("namespaces", namespaces.slice(0, 25).map((ns) => [
    cell(ns), cell(count(valid.get(ns) || 0), "num"), cell(count(held.get(ns) || 0), "num"),
    cell(count(recorded.get(ns) || 0), "num"),
  ]));
  if (ledger === "off") {
    setText("ledger-summary", "The ledger is off: issuances are not recorded.");
  } else {
    const commits = rate(m, "ledger_commit_group_size_count", null, dt);
    const records = rate(m, "ledger_commit_group_size_sum", null, dt);
    const p99commit = quantile(0.99, m, "ledger_commit_duration_seconds") ??
      quantile(0.99, m, "ledger_commit_duration_seconds", true);
    const failures = total(m, "ledger_record_failures_total");
    setText("ledger-summary",
      `Commits ${perSecond(commits)}` +
      (commits ? `, ${(records / commits).toFixed(1)} records each` : "") +
      `, commit p99 ${seconds(p99commit)}; record failures ${count(failures)}` +
      (failures > 0 ? " (each one an issuance refused INTERNAL)" : "") +
      `; pruned ${count(total(m, "ledger_pruned_total"))}. ` +
      (namespaces.length > 25 ? `The 25 namespaces with the most valid certificates of ${namespaces.length}.` : ""));
  }

  const rows = [];
  const hits = total(m, "authn_token_cache_hits_total");
  const misses = total(m, "authn_token_cache_misses_total");
  if (present(m, "authn_token_cache_hits_total")) {
    rows.push(["token cache hit ratio", hits + misses > 0 ? `${((100 * hits) / (hits + misses)).toFixed(1)}%` : "–"]);
    rows.push(["token cache entries", count(total(m, "authn_token_cache_entries"))]);
  }
  if (present(m, "vault_circuit_open")) {
    rows.push(["Vault circuit", total(m, "vault_circuit_open") > 0 ? "OPEN: requests fail fast" : "closed"]);
    for (const x of samples(m, "vault_signings_total")) {
      rows.push([`Vault signings, ${x.labels.outcome || "all"}`, count(x.value)]);
    }
  }
  if (present(m, "cacerts_reloads_total")) {
    rows.push(["cacerts reloads", count(total(m, "cacerts_reloads_total"))]);
    rows.push(["cacerts reloads refused (old CA kept)", count(total(m, "cacerts_reload_failures_total"))]);
  }
  rows.push(["log lines dropped", count(total(m, "log_lines_dropped_total"))]);
  fillTable("other", rows.map(([k, v]) => [cell(k), cell(v, "num")]));
}

// The revocations of unexpired certificates (/v1/revocations) and the CRL
// state from the metrics. Every value is set as text.
function renderRevocations(list, m) {
  const crl = present(m, "crl_published_total")
    ? `CRL: ${count(total(m, "crl_entries"))} entries, next update ` +
      `${date(total(m, "crl_next_update_timestamp_seconds"))}` +
      (total(m, "crl_failures_total") > 0
        ? `, ${count(total(m, "crl_failures_total"))} failed builds`
        : "")
    : "no CRL published by this signer";
  setText("revocations-summary", `${count(list.length)} revoked certificate(s) still unexpired; ${crl}.`);
  fillTable("revocations", list.map((r) => [
    cell(r.spiffeId),
    cell(r.serial, "mono"),
    cell(r.sha256.slice(0, 16) + "…", "mono"),
    cell(r.reason),
    cell(date(r.revokedAt)),
    cell(date(r.notAfter)),
  ]));
}

function renderHealth(ok, text) {
  const el = byId("health");
  el.textContent = ok ? "ready" : `not ready: ${text.trim()}`;
  el.className = ok ? "pill ok" : "pill bad";
}

async function fetchText(path) {
  const response = await fetch(path, { cache: "no-store" });
  return { ok: response.ok, status: response.status, text: await response.text() };
}

async function refresh() {
  try {
    const [status, ready, metrics] = await Promise.all([
      fetchText("/v1/status"), fetchText("/readyz"), fetchText("/metrics"),
    ]);
    if (!status.ok) throw new Error(`/v1/status answered ${status.status}`);
    if (!metrics.ok) throw new Error(`/metrics answered ${metrics.status}`);
    const s = JSON.parse(status.text);
    const m = parseMetrics(metrics.text);
    const t = Date.now() / 1000;
    const dt = previous ? t - previous.t : 0;
    renderStatus(s);
    renderHealth(ready.ok, ready.text);
    renderMetrics(m, dt, s.ledger);
    if (s.ledger !== "off") {
      const revocations = await fetchText("/v1/revocations");
      if (!revocations.ok) throw new Error(`/v1/revocations answered ${revocations.status}`);
      renderRevocations(JSON.parse(revocations.text), m);
    } else {
      setText("revocations-summary", "No ledger on this replica: nothing can be revoked.");
    }
    if (s.fleet) {
      const fleet = await fetchText("/v1/fleet");
      if (!fleet.ok) throw new Error(`/v1/fleet answered ${fleet.status}`);
      renderFleet(JSON.parse(fleet.text));
    }
    if (s.playground) loadPlayground();
    else setText("playground-note", "No policy playground on this signer: set [dashboard] playground_wasm " +
      "to the module scripts/playground builds.");
    previous = { t, m };
    byId("error").hidden = true;
    setText("updated", `updated ${new Date().toISOString().slice(11, 19)} UTC`);
    document.body.dataset.loaded = "true";
  } catch (e) {
    const banner = byId("error");
    banner.textContent = `Cannot read this replica: ${e.message}. Showing the last values read.`;
    banner.hidden = false;
    byId("health").className = "pill unknown";
    byId("health").textContent = "unreachable";
  }
}

// --- policy playground -------------------------------------------------------------

// The HTTP example shipped in istio-manifests/wasmplugin/wasmplugin-http.yaml.
const EXAMPLE_POLICY = {
  trustDomain: "cluster.local",
  mode: "enforce",
  requireMtls: true,
  unknownCertAge: "deny",
  rules: [
    { name: "deny-batch", action: "DENY", from: [{ namespaces: ["batch"] }] },
    {
      name: "frontend-reads-api",
      action: "ALLOW",
      from: [{ principals: ["cluster.local/ns/shop/sa/frontend"] }],
      to: [{ methods: ["GET"], paths: ["/api/*"] }],
      when: { maxCertAge: "36h", minRemainingValidity: "10m" },
    },
  ],
};

let playground = null; // the instantiated module's exports
let playgroundLoading = false;

// "36h", "10m", "90s", "2d", "1h30m" → seconds; "" → null; otherwise NaN.
function parseDuration(text) {
  const t = text.trim();
  if (t === "") return null;
  const re = /(\d+)(d|h|m|s)/gy;
  const unit = { d: 86400, h: 3600, m: 60, s: 1 };
  let total = 0;
  let m;
  let end = 0;
  while ((m = re.exec(t)) !== null) {
    total += Number(m[1]) * unit[m[2]];
    end = re.lastIndex;
  }
  return end === t.length && end > 0 ? total : NaN;
}

async function loadPlayground() {
  if (playground || playgroundLoading) return;
  playgroundLoading = true;
  try {
    const response = await fetch("/dashboard/playground.wasm", { cache: "no-store" });
    if (!response.ok) throw new Error(`/dashboard/playground.wasm answered ${response.status}`);
    const { instance } = await WebAssembly.instantiate(await response.arrayBuffer(), {});
    playground = instance.exports;
    byId("playground-form").hidden = false;
    prefillPlayground();
  } catch (e) {
    setText("playground-note", `The policy playground could not load: ${e.message}.`);
  } finally {
    playgroundLoading = false;
  }
}

// Fills the form from the page's query string (?policy=<JSON or YAML>&peer=...&
// method=...&path=...&host=...&port=...&age=...&lifetime=...&mtls=false),
// so a decision can be shared as a link; decides at once when it names a
// peer.
function prefillPlayground() {
  const q = new URLSearchParams(window.location.search);
  byId("pg-policy").value = q.get("policy") ?? JSON.stringify(EXAMPLE_POLICY, null, 2);
  byId("pg-peer").value = q.get("peer") ?? "spiffe://cluster.local/ns/shop/sa/frontend";
  byId("pg-mtls").checked = q.get("mtls") !== "false";
  for (const [param, id] of [["age", "pg-age"], ["lifetime", "pg-lifetime"], ["method", "pg-method"],
    ["path", "pg-path"], ["host", "pg-host"], ["port", "pg-port"]]) {
    if (q.has(param)) byId(id).value = q.get(param);
  }
  if (!q.has("age") && !q.has("peer")) byId("pg-age").value = "1h";
  byId("pg-evaluate").addEventListener("click", decide);
  if (q.has("peer")) decide();
}

function showDecision(verdict, className, detail) {
  const v = byId("pg-verdict");
  v.textContent = verdict;
  v.className = className;
  setText("pg-detail", detail);
}

// Runs the filter's policy code on the form's policy, peer and request.
function decide() {
  // JSON or YAML, parsed by the module (as Istio turns a WasmPlugin's YAML
  // pluginConfig into the JSON the plugin gets).
  const configText = byId("pg-policy").value;
  const now = Math.floor(Date.now() / 1000);
  const age = parseDuration(byId("pg-age").value);
  const lifetime = parseDuration(byId("pg-lifetime").value);
  if (Number.isNaN(age) || Number.isNaN(lifetime)) {
    showDecision("?", "", "certificate age and lifetime are durations like 36h, 10m or 1h30m");
    return;
  }
  const portText = byId("pg-port").value.trim();
  const port = portText === "" ? null : Number(portText);
  if (port !== null && !(Number.isInteger(port) && port >= 0 && port <= 65535)) {
    showDecision("?", "", "the port is a number from 0 to 65535");
    return;
  }
  const text = (id) => (byId(id).value.trim() === "" ? null : byId(id).value.trim());
  const query = {
    configText,
    peer: {
      mtls: byId("pg-mtls").checked,
      uriSan: text("pg-peer"),
      notBefore: age === null ? null : now - age,
      notAfter: age === null || lifetime === null ? null : now - age + lifetime,
    },
    request: { method: text("pg-method"), path: text("pg-path"), host: text("pg-host"), port },
    now,
  };
  let answer;
  try {
    answer = JSON.parse(callPlayground(JSON.stringify(query)));
  } catch (e) {
    showDecision("deny", "deny", `internal error, the filter would fail closed: ${e.message}`);
    return;
  }
  if (answer.status === "configRefused") {
    showDecision("config refused", "deny",
      `the plugin would refuse this config and fail closed: ${answer.error}`);
  } else if (answer.status === "decided") {
    const parts = [answer.explanation];
    if (!answer.enforced) parts.push("shadow mode: reported, not enforced");
    if (answer.audit) parts.push(`audited by rule ${answer.audit}`);
    if (answer.certAgeSecs !== null) parts.push(`certificate age ${span(answer.certAgeSecs)}`);
    parts.push(`${answer.filterType} filter, ${answer.rules} rule${answer.rules === 1 ? "" : "s"}`);
    showDecision(answer.verdict, answer.verdict, parts.join(" · "));
  } else {
    showDecision("?", "", answer.error || "unexpected answer");
  }
}

// One call through the module's ABI: the query in, the answer out, both
// buffers freed.
function callPlayground(json) {
  const bytes = new TextEncoder().encode(json);
  const ptr = playground.meshward_alloc(bytes.length) >>> 0;
  if (ptr === 0) throw new Error("out of memory");
  new Uint8Array(playground.memory.buffer, ptr, bytes.length).set(bytes);
  const packed = BigInt.asUintN(64, BigInt(playground.meshward_evaluate(ptr, bytes.length)));
  const outPtr = Number(packed >> 32n);
  const outLen = Number(packed & 0xffffffffn);
  const answer = new TextDecoder().decode(new Uint8Array(playground.memory.buffer, outPtr, outLen));
  playground.meshward_free(outPtr, outLen);
  return answer;
}

document.addEventListener("DOMContentLoaded", () => {
  refresh();
  setInterval(refresh, REFRESH_MS);
});
