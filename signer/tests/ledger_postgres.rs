//! The shared ledger: several signer replicas recording into one real
//! PostgreSQL server (started by `support/postgres.rs`), so a certificate
//! issued by one replica is found through another, the rotation sees every
//! replica's issuance, and a database that cannot record (down, locked,
//! impostor) fails issuance instead of letting an unrecorded certificate
//! out.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "support/harness.rs"]
mod harness;
#[path = "support/postgres.rs"]
mod postgres;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use harness::{Harness, assert_refused, http_get};
use meshward_signer::client::IssuedCertificate;
use meshward_signer::config::Config;
use meshward_signer::ledger::{
    CertDigest, CertificateView, IssuanceRecord, Ledger, LedgerMetrics, PostgresConfig,
    PostgresLedger, PostgresOptions, PostgresTls, PostgresTlsMode,
};
use postgres::Postgres;
use time::OffsetDateTime;
use tonic::Code;

fn options(pg: &Postgres, database: &str, replica: &str) -> PostgresOptions {
    PostgresOptions {
        url: pg.url(database),
        password_file: Some(pg.password_file()),
        tls: PostgresTls::Disable,
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
        commit_delay: Duration::from_millis(1),
        replica: replica.to_string(),
    }
}

/// `[ledger.postgres]` for a harness signer named `replica`.
fn shared(pg: &Postgres, database: &str, replica: &str) -> impl FnOnce(&mut Config) + use<> {
    let config = PostgresConfig {
        url: pg.url(database),
        password_file: Some(pg.password_file()),
        tls: PostgresTlsMode::Disable,
        replica: Some(replica.to_string()),
        ..PostgresConfig::default()
    };
    move |c: &mut Config| c.ledger.postgres = Some(config)
}

fn rec(byte: u8, ns: &str, not_after: i64, issued_at: i64) -> IssuanceRecord {
    IssuanceRecord {
        sha256: CertDigest::of(&[byte]),
        serial: format!("{byte:02x}"),
        spiffe_id: format!("spiffe://cluster.local/ns/{ns}/sa/s{byte}"),
        namespace: ns.to_string(),
        not_before: OffsetDateTime::from_unix_timestamp(not_after - 3600).unwrap(),
        not_after: OffsetDateTime::from_unix_timestamp(not_after).unwrap(),
        backend: "builtin".to_string(),
        caller: format!("spiffe://cluster.local/ns/{ns}/sa/s{byte}"),
        issued_at: OffsetDateTime::from_unix_timestamp(issued_at).unwrap(),
    }
}

/// `pay/api` asks again (bounded: 50 tries, 100 ms apart) until the signer
/// issues, after its database came back.
async fn issue_once_the_database_answers(h: &Harness) -> IssuedCertificate {
    for _ in 0..50 {
        if let Ok((_, cert)) = h.issue("pay", "api", &h.opts("pay", "api")).await {
            return cert;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("issuance did not resume once the database answered");
}

fn at(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap()
}

#[tokio::test]
async fn postgres_store_keeps_the_ledger_contract() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_database("contract");
    let a = PostgresLedger::open(&options(&pg, "contract", "signer-0"), None)
        .await
        .unwrap();
    let b = PostgresLedger::open(&options(&pg, "contract", "signer-1"), None)
        .await
        .unwrap();
    let now = 1_800_000_000;

    let first = rec(1, "shop", now + 3600, now - 60);
    a.record(&first).await.unwrap();
    // Recording the same certificate again (a retried write) is not an error
    // and keeps one row.
    a.record(&first).await.unwrap();
    b.record(&first).await.unwrap();
    assert_eq!(
        pg.psql("contract", "SELECT COUNT(*) FROM meshward_certificates"),
        "1"
    );
    // Every field comes back, whichever replica is asked.
    assert_eq!(b.lookup(first.sha256).await.unwrap(), Some(first.clone()));
    assert_eq!(a.lookup(CertDigest::of(b"never")).await.unwrap(), None);

    b.record(&rec(2, "shop", now - 10, now - 7200))
        .await
        .unwrap();
    b.record(&rec(3, "pay", now - 40 * 86_400, now - 41 * 86_400))
        .await
        .unwrap();
    // Gauges count this replica's rows only: summed over replicas, each
    // certificate once.
    let counts_a = a.counts_by_namespace(at(now)).await.unwrap();
    assert_eq!(counts_a.len(), 1);
    assert_eq!(
        (
            counts_a[0].namespace.as_str(),
            counts_a[0].recorded,
            counts_a[0].valid
        ),
        ("shop", 1, 1)
    );
    let counts_b = b.counts_by_namespace(at(now)).await.unwrap();
    let summary: Vec<_> = counts_b
        .iter()
        .map(|c| (c.namespace.as_str(), c.recorded, c.valid))
        .collect();
    assert_eq!(summary, vec![("pay", 1, 0), ("shop", 1, 0)]);
    assert_eq!(
        pg.psql(
            "contract",
            "SELECT recorded_by FROM meshward_certificates ORDER BY id"
        ),
        "signer-0\nsigner-1\nsigner-1"
    );

    // The rotation's question sees every replica's issuance.
    assert_eq!(
        a.latest_not_after_issued_before(at(now - 3600))
            .await
            .unwrap(),
        Some(at(now - 10))
    );
    assert_eq!(
        b.latest_not_after_issued_before(at(now)).await.unwrap(),
        Some(at(now + 3600))
    );
    assert_eq!(a.latest_not_after_issued_before(at(0)).await.unwrap(), None);

    // Retention 30 days: only the record expired 40 days ago goes, whoever
    // recorded it.
    let pruned = a
        .prune(at(now), Duration::from_secs(30 * 86_400))
        .await
        .unwrap();
    assert_eq!(pruned, 1);
    assert_eq!(b.lookup(CertDigest::of(&[3])).await.unwrap(), None);
    assert!(b.lookup(CertDigest::of(&[2])).await.unwrap().is_some());
}

#[tokio::test]
async fn a_certificate_issued_by_one_replica_is_found_through_another() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_database("mesh");
    let a = Harness::start_with(shared(&pg, "mesh", "signer-0")).await;
    let b = Harness::start_with(shared(&pg, "mesh", "signer-1")).await;
    let (_, cert) = a
        .issue("shop", "cart", &a.opts("shop", "cart"))
        .await
        .unwrap();
    let digest = CertDigest::of(&cert.leaf).to_hex();
    // The filter asks whichever replica the Service picks.
    let (status, body) =
        http_get(b.signer.admin_addr(), &format!("/v1/certificates/{digest}")).await;
    assert_eq!(status, 200, "{body}");
    let view: CertificateView = serde_json::from_str(&body).unwrap();
    assert_eq!(view.spiffe_id, "spiffe://cluster.local/ns/shop/sa/cart");
    // And b's rotation would wait for a's certificate before retiring a root.
    let latest = b
        .signer
        .ledger()
        .unwrap()
        .latest_not_after_issued_before(OffsetDateTime::now_utc() + time::Duration::seconds(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.unix_timestamp(), view.not_after);
    a.signer.shutdown().await.unwrap();
    b.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn concurrent_issuances_share_group_commits() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_database("groups");
    let metrics = Arc::new(LedgerMetrics::new(10));
    let ledger = Arc::new(
        PostgresLedger::open(&options(&pg, "groups", "signer-0"), Some(metrics.clone()))
            .await
            .unwrap(),
    );
    let now = 1_800_000_000;
    let tasks: Vec<_> = (0..200u8)
        .map(|i| {
            let ledger = ledger.clone();
            tokio::spawn(async move { ledger.record(&rec(i, "shop", now, now)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(
        pg.psql("groups", "SELECT COUNT(*) FROM meshward_certificates"),
        "200"
    );
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let commits: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("ledger_commit_group_size_count "))
        .expect("group size histogram")
        .parse()
        .unwrap();
    assert!(
        commits < 200,
        "200 concurrent records took {commits} commits"
    );
}

#[tokio::test]
async fn replicas_starting_together_create_the_schema_once() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_database("fresh");
    let (o0, o1, o2) = (
        options(&pg, "fresh", "signer-0"),
        options(&pg, "fresh", "signer-1"),
        options(&pg, "fresh", "signer-2"),
    );
    let (r0, r1, r2) = tokio::join!(
        PostgresLedger::open(&o0, None),
        PostgresLedger::open(&o1, None),
        PostgresLedger::open(&o2, None),
    );
    for r in [r0, r1, r2] {
        r.unwrap();
    }
    assert_eq!(
        pg.psql("fresh", "SELECT version FROM meshward_ledger_schema"),
        "1"
    );
}

#[tokio::test]
async fn a_ledger_written_by_a_newer_signer_is_refused() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_database("newer");
    drop(
        PostgresLedger::open(&options(&pg, "newer", "signer-0"), None)
            .await
            .unwrap(),
    );
    pg.psql("newer", "UPDATE meshward_ledger_schema SET version = 2");
    let err = PostgresLedger::open(&options(&pg, "newer", "signer-0"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("schema version 2"), "{err}");
}

#[tokio::test]
async fn wrong_database_password_is_refused_at_start() {
    let Some(pg) = Postgres::start() else { return };
    let wrong = pg.dir.path().join("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let opts = PostgresOptions {
        password_file: Some(wrong),
        ..options(&pg, "postgres", "signer-0")
    };
    let err = PostgresLedger::open(&opts, None).await.unwrap_err();
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );
    // A password written into the URL (so into the ConfigMap) is refused.
    let opts = PostgresOptions {
        url: format!("{} password={}", pg.url("postgres"), postgres::PASSWORD),
        password_file: None,
        ..options(&pg, "postgres", "signer-0")
    };
    let err = PostgresLedger::open(&opts, None).await.unwrap_err();
    assert!(err.to_string().contains("password_file"), "{err}");
}

#[tokio::test]
async fn ledger_connection_to_an_impostor_database_is_refused() {
    let Some(pg) = Postgres::start_tls() else {
        return;
    };
    // The roots the signer trusts are another CA's: whoever answers on the
    // database's address with a certificate not from them is not our
    // database, and gets no issuance records (nor the password).
    let (other_ca, _, _) = postgres::server_tls();
    let other = pg.dir.path().join("other-ca.pem");
    std::fs::write(&other, other_ca).unwrap();
    let verify = |ca_file| PostgresOptions {
        tls: PostgresTls::VerifyFull { ca_file },
        ..options(&pg, "postgres", "signer-0")
    };
    let err = PostgresLedger::open(&verify(other), None)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
    // The right roots connect, over TLS.
    let ledger = PostgresLedger::open(&verify(pg.ca_file()), None)
        .await
        .unwrap();
    ledger
        .record(&rec(9, "shop", 1_800_000_000, 1_800_000_000))
        .await
        .unwrap();
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE application_name = 'meshward-signer'"
        ),
        "t"
    );
}

#[tokio::test]
async fn a_database_without_tls_is_refused_when_tls_is_required() {
    // A man in the middle that answers "no TLS" must not downgrade the
    // connection to plain text.
    let Some(pg) = Postgres::start() else { return };
    let (ca, _, _) = postgres::server_tls();
    let ca_file = pg.dir.path().join("ca-for-plain.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let opts = PostgresOptions {
        tls: PostgresTls::VerifyFull { ca_file },
        ..options(&pg, "postgres", "signer-0")
    };
    let err = PostgresLedger::open(&opts, None).await.unwrap_err();
    assert!(
        err.to_string().contains("server does not support TLS"),
        "{err}"
    );
}

#[tokio::test]
async fn database_outage_fails_issuance_instead_of_handing_out_unrecorded_certificates() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    pg.create_database("outage");
    let h = Harness::start_with(shared(&pg, "outage", "signer-0")).await;
    h.issue("pay", "api", &h.opts("pay", "api")).await.unwrap();

    pg.stop();
    let refused = h.issue("pay", "api", &h.opts("pay", "api")).await;
    assert_refused(refused, Code::Internal, "ledger");

    // Back up: the signer reconnects by itself (bounded retries; the pool
    // drops the connections the outage closed).
    pg.restart();
    let cert = issue_once_the_database_answers(&h).await;
    let digest = CertDigest::of(&cert.leaf).to_hex();
    assert_eq!(
        pg.psql(
            "outage",
            &format!(
                "SELECT COUNT(*) FROM meshward_certificates WHERE sha256 = '\\x{digest}'::bytea"
            )
        ),
        "1"
    );
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_locked_ledger_table_cannot_hold_issuances_past_write_timeout() {
    let Some(pg) = Postgres::start() else { return };
    pg.create_database("locked");
    let h = Harness::start_with(|c| {
        shared(&pg, "locked", "signer-0")(c);
        let p = c.ledger.postgres.as_mut().unwrap();
        p.write_timeout = Duration::from_millis(500);
        p.statement_timeout = Duration::from_secs(60);
    })
    .await;
    h.issue("pay", "api", &h.opts("pay", "api")).await.unwrap();

    // Another session holds the table locked (a migration, a stuck VACUUM
    // FULL): inserts wait, and the server's statement_timeout is far away.
    let mut locker = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf 'BEGIN; LOCK TABLE meshward_certificates IN ACCESS EXCLUSIVE MODE; SELECT 1; SELECT pg_sleep(30);' | {}",
            pg.psql_command("locked")
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded) until the lock is held.
    let mut held = false;
    for _ in 0..100 {
        if pg.psql(
            "locked",
            "SELECT COUNT(*) FROM pg_locks WHERE mode = 'AccessExclusiveLock' AND relation = 'meshward_certificates'::regclass",
        ) == "1"
        {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held, "the locking session never got its lock");
    // The lock is held for 30 s; the refusal names the client-side bound.
    let refused = h.issue("pay", "api", &h.opts("pay", "api")).await;
    let _ = locker.kill();
    let _ = locker.wait();
    assert_refused(refused, Code::Internal, "write_timeout");
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_signer_started_while_its_database_is_down_issues_once_it_is_back() {
    // A failover during a rollout: the database does not answer when the
    // signer starts. The signer must start (not crash-loop into Kubernetes'
    // back-off, taking bundle distribution with it), refuse to issue
    // unrecorded certificates meanwhile, and issue as soon as it answers.
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    pg.create_database("failover");
    pg.stop();
    let h = Harness::start_with(shared(&pg, "failover", "signer-0")).await;
    let refused = h.issue("pay", "api", &h.opts("pay", "api")).await;
    assert_refused(refused, Code::Internal, "ledger");
    let (status, _) = http_get(h.signer.admin_addr(), "/readyz").await;
    assert_eq!(status, 200, "the signer serves (bundle, probes) meanwhile");

    pg.restart();
    let cert = issue_once_the_database_answers(&h).await;
    // The schema was created on that first use, and the record is in it.
    assert_eq!(
        pg.psql("failover", "SELECT version FROM meshward_ledger_schema"),
        "1"
    );
    let digest = CertDigest::of(&cert.leaf).to_hex();
    let (status, _) = http_get(h.signer.admin_addr(), &format!("/v1/certificates/{digest}")).await;
    assert_eq!(status, 200);
    h.signer.shutdown().await.unwrap();
}

#[tokio::test]
async fn sqlite_records_are_imported_into_the_shared_ledger_once() {
    use meshward_signer::ledger::{SqliteLedger, SqliteOptions};
    // Moving an existing deployment to the shared ledger: each replica's
    // SQLite records (the audit trail, and what root retirement waits for)
    // are copied over with `meshward-signer ledger import`, run in its pod.
    let Some(pg) = Postgres::start() else { return };
    pg.create_database("moving");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ledger.sqlite");
    let sqlite = SqliteLedger::open(&SqliteOptions {
        path: file.clone(),
        busy_timeout: Duration::from_secs(1),
        commit_delay: Duration::ZERO,
    })
    .unwrap();
    let now = 1_800_000_000;
    let records: Vec<IssuanceRecord> = (0..2500u32)
        .map(|i| {
            let mut r = rec(0, "shop", now + i64::from(i), now - 60);
            r.sha256 = CertDigest::of(&i.to_be_bytes());
            r.serial = format!("{i:x}");
            r
        })
        .collect();
    for r in &records {
        sqlite.record(r).await.unwrap();
    }
    // One of them is already in the shared ledger (recorded twice during a
    // rollout, say).
    let shared = PostgresLedger::open(&options(&pg, "moving", "signer-1"), None)
        .await
        .unwrap();
    shared.record(&records[7]).await.unwrap();

    let mut config = Config::default();
    config.ledger.postgres = Some(PostgresConfig {
        url: pg.url("moving"),
        password_file: Some(pg.password_file()),
        tls: PostgresTlsMode::Disable,
        replica: Some("signer-0".to_string()),
        ..PostgresConfig::default()
    });
    let cfg = dir.path().join("signer.toml");
    std::fs::write(&cfg, config.to_toml().unwrap()).unwrap();
    let import = || {
        let out = Command::new(env!("CARGO_BIN_EXE_meshward-signer"))
            .args(["ledger", "import", "--from"])
            .arg(&file)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = import();
    assert!(
        first.contains("imported 2499 new records of 2500 read"),
        "{first}"
    );
    // Every record, every field, from the shared ledger.
    for r in [&records[0], &records[7], &records[1999], &records[2499]] {
        assert_eq!(shared.lookup(r.sha256).await.unwrap().as_ref(), Some(r));
    }
    assert_eq!(
        pg.psql(
            "moving",
            "SELECT recorded_by, COUNT(*) FROM meshward_certificates GROUP BY 1 ORDER BY 1"
        ),
        "signer-0|2499\nsigner-1|1"
    );
    // Again (an interrupted import re-run): nothing new.
    let again = import();
    assert!(
        again.contains("imported 0 new records of 2500 read"),
        "{again}"
    );
}

#[tokio::test]
async fn a_revocation_made_through_one_replica_is_enforced_by_every_replica() {
    use meshward_signer::client::{CaClient, CallOptions, WorkloadKey, WorkloadKeyType};
    use meshward_signer::ledger::{RevocationReason, RevocationTarget};
    let Some(pg) = Postgres::start() else { return };
    pg.create_database("revoke");
    let a = Harness::start_with(shared(&pg, "revoke", "signer-0")).await;
    let b = Harness::start_with(shared(&pg, "revoke", "signer-1")).await;
    let (key, cert) = a
        .issue("shop", "cart", &a.opts("shop", "cart"))
        .await
        .unwrap();
    // The operator runs `ca revoke` in signer-1's pod.
    let revoked = b
        .signer
        .ledger()
        .unwrap()
        .revoke(
            &RevocationTarget::spiffe_id("spiffe://cluster.local/ns/shop/sa/cart").unwrap(),
            RevocationReason::KeyCompromise,
            OffsetDateTime::now_utc() + time::Duration::seconds(1),
        )
        .await
        .unwrap();
    assert_eq!(revoked.len(), 1);
    // signer-0 refuses the certificate as a renewal credential at once.
    let renewer = CaClient::connect_with_client_cert(
        a.signer.grpc_addr(),
        a.signer.roots_pem(),
        "localhost",
        &cert.chain_pem(),
        &key.private_key_pem(),
    )
    .await
    .unwrap();
    let r = renewer
        .request_certificate(
            &WorkloadKey::generate(WorkloadKeyType::EcdsaP256).unwrap(),
            &harness::id("shop", "cart"),
            &CallOptions::default(),
        )
        .await;
    assert_refused(r, Code::PermissionDenied, "was revoked");
    // And both replicas' ledger answers carry the revocation.
    let digest = CertDigest::of(&cert.leaf).to_hex();
    for h in [&a, &b] {
        let (status, body) =
            http_get(h.signer.admin_addr(), &format!("/v1/certificates/{digest}")).await;
        assert_eq!(status, 200, "{body}");
        let view: CertificateView = serde_json::from_str(&body).unwrap();
        assert_eq!(
            view.revocation.unwrap().reason,
            RevocationReason::KeyCompromise
        );
    }
    a.signer.shutdown().await.unwrap();
    b.signer.shutdown().await.unwrap();
}
