//! The shared ledger store: one PostgreSQL database for every signer
//! replica, so a certificate issued by one replica is found by a lookup that
//! reaches another (the filter asks whichever replica the Service picks),
//! and the rotation's "latest notAfter issued before" is the whole mesh's,
//! not one replica's.
//!
//! **Durability.** Every session runs with `synchronous_commit = on`
//! (set in the startup packet, whatever the server's default), so `record`
//! returns only once the commit is flushed on the primary (and on
//! synchronous standbys, when the server has them): the same
//! record-then-respond promise as the SQLite store.
//!
//! **Writes** are group commits, as in the SQLite store: one writer task
//! takes every record waiting (up to [`MAX_GROUP`]) and inserts them with one
//! statement (`INSERT … SELECT FROM unnest(arrays) ON CONFLICT DO NOTHING`:
//! one round trip, one commit, one WAL flush), answering each caller after
//! that commit. While records arrive concurrently it first waits
//! `commit_delay`. A group that does not commit within `write_timeout`
//! fails its requests (nothing handed out) instead of holding them.
//!
//! **Reads** (lookups, counts, the rotation query, pruning) take a
//! connection from their own pool (`pool_size`), and the writer has a pool
//! of its own: a flood of lookups (any pod can ask the admin port) waits
//! for read connections, never for the writer's, so it cannot delay an
//! issuance.
//!
//! **Replicas.** Each row names the replica that recorded it
//! (`recorded_by`, the pod name by default). The per-namespace gauges count
//! only this replica's rows, so summing them over replicas counts each
//! certificate once, as with per-replica SQLite files. Lookups, pruning and
//! the rotation query see every row.
//!
//! **Schema** (version 1, in `meshward_ledger_schema`), created on first
//! use under an advisory lock (replicas starting together create it once).
//! A database that refuses at start (wrong password, no such database, a
//! certificate that does not verify, a newer schema) stops the signer; one
//! that cannot be reached does not (a failover during a rollout must not
//! crash-loop the signer into Kubernetes' back-off): the signer serves, and
//! issuance fails until the database answers.
//!
//! ```sql
//! meshward_certificates (id BIGINT IDENTITY PRIMARY KEY,
//!     sha256 BYTEA NOT NULL UNIQUE (32 bytes), serial, spiffe_id, namespace,
//!     not_before, not_after, backend, caller, issued_at, recorded_by)
//! indexes: UNIQUE (sha256), (namespace, not_after), (not_after), (issued_at),
//!          (recorded_by, namespace)
//! ```
//!
//! A version this signer does not know (written by a newer signer) is
//! refused rather than misread.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::config::SslMode;

use super::{
    CertDigest, IssuanceRecord, Ledger, LedgerError, LedgerFuture, LedgerMetrics, NamespaceCount,
    Revocation, RevocationReason, RevocationTarget,
};

/// The schema version this signer writes.
pub const SCHEMA_VERSION: i32 = 1;

/// Connections of the writer's own pool (one in use at a time; a second
/// is there while a broken one is replaced).
pub const WRITER_CONNECTIONS: usize = 2;

/// Most records inserted by one group commit.
pub const MAX_GROUP: usize = 512;

/// Rows deleted per statement when pruning (short transactions: replicas
/// recording meanwhile never wait long behind a prune).
const PRUNE_BATCH: i64 = 10_000;

/// Key of the advisory lock taken while the schema is checked or created.
const SCHEMA_LOCK: i64 = 0x6d65_7368_7761_7264; // "meshward"

const SCHEMA: &str = "
CREATE TABLE meshward_certificates (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sha256      BYTEA NOT NULL UNIQUE CHECK (octet_length(sha256) = 32),
    serial      TEXT NOT NULL,
    spiffe_id   TEXT NOT NULL,
    namespace   TEXT NOT NULL,
    not_before  BIGINT NOT NULL,
    not_after   BIGINT NOT NULL,
    backend     TEXT NOT NULL,
    caller      TEXT NOT NULL,
    issued_at   BIGINT NOT NULL,
    recorded_by TEXT NOT NULL
);
CREATE INDEX meshward_certificates_namespace ON meshward_certificates (namespace, not_after);
CREATE INDEX meshward_certificates_not_after ON meshward_certificates (not_after);
CREATE INDEX meshward_certificates_issued_at ON meshward_certificates (issued_at);
CREATE INDEX meshward_certificates_recorded_by ON meshward_certificates (recorded_by, namespace);
";

/// Revocations, one row per revoked certificate (`ledger/revocation.rs`);
/// created if missing on every start, so a v1 database written before
/// revocations existed gains it without a version change.
const REVOCATIONS: &str = "
CREATE TABLE IF NOT EXISTS meshward_revocations (
    sha256     BYTEA PRIMARY KEY CHECK (octet_length(sha256) = 32),
    serial     TEXT NOT NULL,
    spiffe_id  TEXT NOT NULL,
    not_after  BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS meshward_revocations_not_after ON meshward_revocations (not_after);
";

const REVOCATION_COLUMNS: &str = "sha256, serial, spiffe_id, not_after, revoked_at, reason";

const INSERT: &str = "INSERT INTO meshward_certificates
   (sha256, serial, spiffe_id, namespace, not_before, not_after, backend, caller, issued_at, recorded_by)
 SELECT d, s, i, n, nb, na, b, c, at, $10
 FROM unnest($1::bytea[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[],
             $7::text[], $8::text[], $9::int8[]) AS r(d, s, i, n, nb, na, b, c, at)
 ON CONFLICT (sha256) DO NOTHING";

const LOOKUP: &str =
    "SELECT serial, spiffe_id, namespace, not_before, not_after, backend, caller, issued_at
 FROM meshward_certificates WHERE sha256 = $1";

/// How the signer reaches the database (`[ledger.postgres]`, resolved).
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// libpq-style connection string or `postgres://` URL, without a
    /// password.
    pub url: String,
    /// File holding the password (a mounted Secret), if the server asks one.
    pub password_file: Option<PathBuf>,
    /// TLS to the server.
    pub tls: PostgresTls,
    /// Connections for reads; the writer has [`WRITER_CONNECTIONS`] more.
    pub pool_size: usize,
    /// Bound on opening a connection and on waiting for a pooled one.
    pub connect_timeout: Duration,
    /// Server-side bound on each statement (`statement_timeout`).
    pub statement_timeout: Duration,
    /// Bound on one group commit, client side: past it the group's requests
    /// fail.
    pub write_timeout: Duration,
    /// See the module docs.
    pub commit_delay: Duration,
    /// This replica's name in `recorded_by`.
    pub replica: String,
}

/// TLS to the database server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostgresTls {
    /// TLS required; the server's certificate must chain to `ca_file` and
    /// name the host connected to.
    VerifyFull {
        /// PEM roots.
        ca_file: PathBuf,
    },
    /// Plain TCP (a sidecar or a local socket encrypts, or nothing does).
    Disable,
}

type Reply = oneshot::Sender<Result<(), LedgerError>>;

/// The PostgreSQL ledger.
#[derive(Clone)]
pub struct PostgresLedger {
    pool: Pool,
    writer: mpsc::UnboundedSender<(Box<IssuanceRecord>, Reply)>,
    replica: Arc<str>,
    schema: SchemaChecked,
}

impl std::fmt::Debug for PostgresLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresLedger")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

fn open_err(reason: impl Into<String>) -> LedgerError {
    LedgerError::Open {
        path: "[ledger.postgres]".to_string(),
        reason: reason.into(),
    }
}

/// A driver error with what the server said (tokio-postgres' own text is
/// only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    match std::error::Error::source(e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(pg) => describe(pg),
        other => other.to_string(),
    }
}

fn pool_err(op: &'static str) -> impl Fn(deadpool_postgres::PoolError) -> LedgerError {
    move |e| LedgerError::Store {
        op,
        reason: describe_pool(&e),
    }
}

fn pg_err(op: &'static str) -> impl Fn(tokio_postgres::Error) -> LedgerError {
    move |e| LedgerError::Store {
        op,
        reason: describe(&e),
    }
}

/// The driver config: the URL, the password from its file, timeouts and
/// `synchronous_commit = on`.
fn driver_config(opts: &PostgresOptions) -> Result<tokio_postgres::Config, LedgerError> {
    let mut config = tokio_postgres::Config::from_str(&opts.url)
        .map_err(|e| open_err(format!("url: {}", describe(&e))))?;
    if config.get_password().is_some() {
        return Err(open_err(
            "url carries a password: put it in password_file (a mounted Secret) instead",
        ));
    }
    if config.get_user().is_none() {
        return Err(open_err("url names no user"));
    }
    if let Some(file) = &opts.password_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| open_err(format!("password_file {}: {e}", file.display())))?;
        let password = text.trim_end_matches(['\r', '\n']);
        if password.is_empty() {
            return Err(open_err(format!(
                "password_file {} is empty",
                file.display()
            )));
        }
        config.password(password);
    }
    let mut options = config.get_options().unwrap_or_default().to_string();
    options.push_str(&format!(
        " -c synchronous_commit=on -c statement_timeout={}",
        opts.statement_timeout.as_millis().max(1)
    ));
    config
        .options(options.trim_start())
        .connect_timeout(opts.connect_timeout)
        .application_name("meshward-signer")
        .ssl_mode(match opts.tls {
            PostgresTls::VerifyFull { .. } => SslMode::Require,
            PostgresTls::Disable => SslMode::Disable,
        });
    Ok(config)
}

fn tls_connector(
    ca_file: &PathBuf,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, LedgerError> {
    let pem = std::fs::read(ca_file)
        .map_err(|e| open_err(format!("ca_file {}: {e}", ca_file.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
        let cert: rustls_pki_types::CertificateDer<'static> =
            cert.map_err(|e| open_err(format!("ca_file {}: {e}", ca_file.display())))?;
        roots
            .add(cert)
            .map_err(|e| open_err(format!("ca_file {}: {e}", ca_file.display())))?;
    }
    if roots.is_empty() {
        return Err(open_err(format!(
            "ca_file {} holds no certificate",
            ca_file.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| open_err(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl PostgresLedger {
    /// Connect, check (or create) the schema and start the writer task (it
    /// ends when the last clone is dropped). Fails when the database refuses
    /// (a schema this signer does not know, no right to create it); a
    /// database that cannot be reached is logged and tried again before each
    /// operation, which fails until then (a signer that cannot record does
    /// not issue).
    pub async fn open(
        opts: &PostgresOptions,
        metrics: Option<Arc<LedgerMetrics>>,
    ) -> Result<Self, LedgerError> {
        if opts.pool_size == 0 {
            return Err(open_err("pool_size must be at least 1"));
        }
        if opts.replica.is_empty() {
            return Err(open_err("replica name is empty"));
        }
        let config = driver_config(opts)?;
        let pool = build_pool(opts, config.clone(), opts.pool_size)?;
        let writer_pool = build_pool(opts, config, WRITER_CONNECTIONS)?;
        let schema = SchemaChecked::default();
        match ensure_schema(&pool).await {
            Ok(()) => {
                let _ = schema.set(());
            }
            Err(SchemaError::Refused(reason)) => return Err(open_err(reason)),
            // A database failing over while the signer restarts must not
            // crash-loop the signer (and its bundle distribution) into
            // Kubernetes' back-off: serve, and let issuance fail until the
            // database answers.
            Err(SchemaError::Unreachable(reason)) => tracing::warn!(
                %reason,
                "ledger database unreachable at start: serving, but every issuance fails \
                 until it answers (tried again before each)"
            ),
        }
        let (writer, rx) = mpsc::unbounded_channel();
        let replica: Arc<str> = opts.replica.as_str().into();
        tokio::spawn(writer_loop(
            writer_pool,
            schema.clone(),
            rx,
            metrics,
            opts.commit_delay,
            opts.write_timeout,
            replica.clone(),
        ));
        Ok(Self {
            pool,
            writer,
            replica,
            schema,
        })
    }

    /// This replica's name in `recorded_by`.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Insert `records` recorded elsewhere (`ledger import`), in one
    /// statement; those already there are skipped. Returns how many were
    /// new.
    pub async fn import(&self, records: &[IssuanceRecord]) -> Result<u64, LedgerError> {
        let refs: Vec<&IssuanceRecord> = records.iter().collect();
        insert_group(&self.pool, &self.schema, &refs, &self.replica)
            .await
            .map_err(|reason| LedgerError::Store {
                op: "import",
                reason,
            })
    }

    async fn client(&self, op: &'static str) -> Result<deadpool_postgres::Object, LedgerError> {
        schema_ready(&self.schema, &self.pool, op).await?;
        self.pool.get().await.map_err(pool_err(op))
    }
}

/// A pool of `size` connections.
fn build_pool(
    opts: &PostgresOptions,
    config: tokio_postgres::Config,
    size: usize,
) -> Result<Pool, LedgerError> {
    let manager_config = || ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match &opts.tls {
        PostgresTls::VerifyFull { ca_file } => {
            Manager::from_config(config, tls_connector(ca_file)?, manager_config())
        }
        PostgresTls::Disable => {
            Manager::from_config(config, tokio_postgres::NoTls, manager_config())
        }
    };
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(opts.connect_timeout))
        .create_timeout(Some(opts.connect_timeout))
        .recycle_timeout(Some(opts.connect_timeout))
        .build()
        .map_err(|e| open_err(e.to_string()))
}

/// Why the schema could not be checked.
#[derive(Debug)]
enum SchemaError {
    /// The database could not be reached (down, failing over, network):
    /// checked again before the next operation.
    Unreachable(String),
    /// The database answered, and this signer must not use it (a newer
    /// schema, no right to create the tables).
    Refused(String),
}

impl std::fmt::Display for SchemaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchemaError::Unreachable(r) | SchemaError::Refused(r) => f.write_str(r),
        }
    }
}

/// Whether connecting failed for want of a reachable server (refused,
/// reset, timed out, no route, no DNS answer: it may come back) rather than
/// because the server answered no (authentication, no such database) or
/// could not prove who it is (TLS).
fn unreachable(e: &deadpool_postgres::PoolError) -> bool {
    let pg = match e {
        deadpool_postgres::PoolError::Timeout(_) => return true,
        deadpool_postgres::PoolError::Backend(pg) => pg,
        _ => return false,
    };
    if let Some(db) = pg.as_db_error() {
        return transient(db.code().code());
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(pg);
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            // tokio-rustls reports a failed handshake as an I/O error.
            return !io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>());
        }
        cause = err.source();
    }
    false
}

/// Whether a server error (its SQLSTATE) is a state the server passes
/// through — starting up or shutting down (class 57), out of connections
/// (53), a connection failure (08), a conflict to retry (40), a standby
/// refusing writes during a failover (25006) — rather than a refusal that
/// holds until someone changes something (authentication 28, no such
/// database 3D000, no privilege 42501, ...).
fn transient(sqlstate: &str) -> bool {
    sqlstate == "25006"
        || ["08", "40", "53", "57"]
            .iter()
            .any(|class| sqlstate.starts_with(class))
}

/// The schema checked once per process: a database unreachable at start is
/// checked again before each operation until it answers.
type SchemaChecked = Arc<tokio::sync::OnceCell<()>>;

/// Check (once) that the schema is there, before an operation `op`.
async fn schema_ready(
    checked: &SchemaChecked,
    pool: &Pool,
    op: &'static str,
) -> Result<(), LedgerError> {
    checked
        .get_or_try_init(|| ensure_schema(pool))
        .await
        .map(|_| ())
        .map_err(|e| LedgerError::Store {
            op,
            reason: e.to_string(),
        })
}

/// Check the schema version, creating the schema on an empty database.
async fn ensure_schema(pool: &Pool) -> Result<(), SchemaError> {
    let mut client = pool.get().await.map_err(|e| {
        let reason = format!("connecting: {}", describe_pool(&e));
        if unreachable(&e) {
            SchemaError::Unreachable(reason)
        } else {
            SchemaError::Refused(reason)
        }
    })?;
    // The server answering with an error (no right to create tables, …) is
    // a refusal; losing the connection on the way is not.
    let schema_err = |e: tokio_postgres::Error| {
        let reason = format!("schema: {}", describe(&e));
        match e.as_db_error() {
            Some(db) if !transient(db.code().code()) => SchemaError::Refused(reason),
            _ => SchemaError::Unreachable(reason),
        }
    };
    let tx = client.transaction().await.map_err(schema_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await
        .map_err(schema_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS meshward_ledger_schema (version INTEGER NOT NULL)",
    )
    .await
    .map_err(schema_err)?;
    let versions: Vec<i32> = tx
        .query("SELECT version FROM meshward_ledger_schema", &[])
        .await
        .map_err(schema_err)?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(schema_err)?;
    match versions.as_slice() {
        [] => {
            tx.batch_execute(SCHEMA).await.map_err(schema_err)?;
            tx.execute(
                "INSERT INTO meshward_ledger_schema (version) VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .await
            .map_err(schema_err)?;
            tracing::info!(
                version = SCHEMA_VERSION,
                "ledger schema created in PostgreSQL"
            );
        }
        [v] if *v == SCHEMA_VERSION => {}
        [v] => {
            return Err(SchemaError::Refused(format!(
                "the database holds ledger schema version {v}; this signer knows only {SCHEMA_VERSION} (a newer signer wrote it?)"
            )));
        }
        more => {
            return Err(SchemaError::Refused(format!(
                "meshward_ledger_schema holds {} rows, expected one",
                more.len()
            )));
        }
    }
    tx.batch_execute(REVOCATIONS).await.map_err(schema_err)?;
    tx.commit().await.map_err(schema_err)
}

/// The writer task: one group commit per turn.
async fn writer_loop(
    pool: Pool,
    schema: SchemaChecked,
    mut rx: mpsc::UnboundedReceiver<(Box<IssuanceRecord>, Reply)>,
    metrics: Option<Arc<LedgerMetrics>>,
    commit_delay: Duration,
    write_timeout: Duration,
    replica: Arc<str>,
) {
    let mut previous = 0;
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        take_waiting(&mut rx, &mut group);
        if previous > 1 && !commit_delay.is_zero() && group.len() < MAX_GROUP {
            tokio::time::sleep(commit_delay).await;
            take_waiting(&mut rx, &mut group);
        }
        previous = group.len();
        let started = Instant::now();
        let records: Vec<&IssuanceRecord> = group.iter().map(|(r, _)| r.as_ref()).collect();
        let result = match tokio::time::timeout(
            write_timeout,
            insert_group(&pool, &schema, &records, &replica),
        )
        .await
        {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(format!(
                "group commit of {} records not done within write_timeout {}",
                records.len(),
                humantime::format_duration(write_timeout)
            )),
        };
        if let Some(m) = &metrics {
            m.committed(group.len(), started.elapsed().as_secs_f64());
        }
        for (_, reply) in group {
            let _ = reply.send(result.clone().map_err(|reason| LedgerError::Store {
                op: "record",
                reason,
            }));
        }
    }
}

fn take_waiting(
    rx: &mut mpsc::UnboundedReceiver<(Box<IssuanceRecord>, Reply)>,
    group: &mut Vec<(Box<IssuanceRecord>, Reply)>,
) {
    while group.len() < MAX_GROUP {
        match rx.try_recv() {
            Ok(job) => group.push(job),
            Err(_) => return,
        }
    }
}

/// One statement, one commit for the whole group; the error is the reason
/// every caller in the group hears.
async fn insert_group(
    pool: &Pool,
    schema: &SchemaChecked,
    records: &[&IssuanceRecord],
    replica: &str,
) -> Result<u64, String> {
    schema_ready(schema, pool, "record")
        .await
        .map_err(|e| match e {
            LedgerError::Store { reason, .. } => reason,
            other => other.to_string(),
        })?;
    let client = pool.get().await.map_err(|e| describe_pool(&e))?;
    let stmt = client
        .prepare_cached(INSERT)
        .await
        .map_err(|e| describe(&e))?;
    let digests: Vec<&[u8]> = records.iter().map(|r| &r.sha256.as_bytes()[..]).collect();
    let serials: Vec<&str> = records.iter().map(|r| r.serial.as_str()).collect();
    let ids: Vec<&str> = records.iter().map(|r| r.spiffe_id.as_str()).collect();
    let namespaces: Vec<&str> = records.iter().map(|r| r.namespace.as_str()).collect();
    let not_before: Vec<i64> = records
        .iter()
        .map(|r| r.not_before.unix_timestamp())
        .collect();
    let not_after: Vec<i64> = records
        .iter()
        .map(|r| r.not_after.unix_timestamp())
        .collect();
    let backends: Vec<&str> = records.iter().map(|r| r.backend.as_str()).collect();
    let callers: Vec<&str> = records.iter().map(|r| r.caller.as_str()).collect();
    let issued_at: Vec<i64> = records
        .iter()
        .map(|r| r.issued_at.unix_timestamp())
        .collect();
    client
        .execute(
            &stmt,
            &[
                &digests,
                &serials,
                &ids,
                &namespaces,
                &not_before,
                &not_after,
                &backends,
                &callers,
                &issued_at,
                &replica,
            ],
        )
        .await
        .map_err(|e| describe(&e))
}

fn from_unix(what: &str, secs: i64) -> Result<OffsetDateTime, LedgerError> {
    OffsetDateTime::from_unix_timestamp(secs).map_err(|e| LedgerError::Corrupt {
        sha256: what.to_string(),
        reason: format!("timestamp {secs}: {e}"),
    })
}

/// The certificates a target names, as a `WHERE` clause and its `$1`.
fn target_clause(target: &RevocationTarget) -> (&'static str, Box<ToSqlSync>) {
    match target {
        RevocationTarget::Sha256(d) => ("sha256 = $1", Box::new(d.as_bytes().to_vec())),
        RevocationTarget::Serial(s) => ("serial = $1", Box::new(s.clone())),
        RevocationTarget::SpiffeId(id) => ("spiffe_id = $1", Box::new(id.clone())),
    }
}

type ToSqlSync = dyn tokio_postgres::types::ToSql + Sync + Send;

fn rows_to_revocations(rows: &[tokio_postgres::Row]) -> Result<Vec<Revocation>, LedgerError> {
    rows.iter()
        .map(|row| {
            let get_err = |e: tokio_postgres::Error| LedgerError::Corrupt {
                sha256: "meshward_revocations".to_string(),
                reason: describe(&e),
            };
            let digest: Vec<u8> = row.try_get(0).map_err(get_err)?;
            let reason: String = row.try_get(5).map_err(get_err)?;
            super::sqlite::revocation_row(
                &digest,
                row.try_get(1).map_err(get_err)?,
                row.try_get(2).map_err(get_err)?,
                row.try_get(3).map_err(get_err)?,
                row.try_get(4).map_err(get_err)?,
                &reason,
            )
        })
        .collect()
}

fn row_to_record(
    sha256: CertDigest,
    row: &tokio_postgres::Row,
) -> Result<IssuanceRecord, LedgerError> {
    let corrupt = |e: tokio_postgres::Error| LedgerError::Corrupt {
        sha256: sha256.to_hex(),
        reason: describe(&e),
    };
    let hex = sha256.to_hex();
    Ok(IssuanceRecord {
        sha256,
        serial: row.try_get(0).map_err(corrupt)?,
        spiffe_id: row.try_get(1).map_err(corrupt)?,
        namespace: row.try_get(2).map_err(corrupt)?,
        not_before: from_unix(&hex, row.try_get(3).map_err(corrupt)?)?,
        not_after: from_unix(&hex, row.try_get(4).map_err(corrupt)?)?,
        backend: row.try_get(5).map_err(corrupt)?,
        caller: row.try_get(6).map_err(corrupt)?,
        issued_at: from_unix(&hex, row.try_get(7).map_err(corrupt)?)?,
    })
}

impl Ledger for PostgresLedger {
    fn record<'a>(&'a self, rec: &'a IssuanceRecord) -> LedgerFuture<'a, ()> {
        Box::pin(async move {
            let gone = || LedgerError::Store {
                op: "record",
                reason: "the ledger writer task has stopped".to_string(),
            };
            let (reply, answer) = oneshot::channel();
            self.writer
                .send((Box::new(rec.clone()), reply))
                .map_err(|_| gone())?;
            answer.await.map_err(|_| gone())?
        })
    }

    fn lookup(&self, sha256: CertDigest) -> LedgerFuture<'_, Option<IssuanceRecord>> {
        Box::pin(async move {
            let client = self.client("lookup").await?;
            let stmt = client
                .prepare_cached(LOOKUP)
                .await
                .map_err(pg_err("lookup"))?;
            let digest: &[u8] = sha256.as_bytes();
            let row = client
                .query_opt(&stmt, &[&digest])
                .await
                .map_err(pg_err("lookup"))?;
            row.map(|row| row_to_record(sha256, &row)).transpose()
        })
    }

    fn prune(&self, now: OffsetDateTime, retention: Duration) -> LedgerFuture<'_, u64> {
        let cutoff = now
            .unix_timestamp()
            .saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
        Box::pin(async move {
            let client = self.client("prune").await?;
            let stmt = client
                .prepare_cached(
                    "DELETE FROM meshward_certificates WHERE id IN
                       (SELECT id FROM meshward_certificates WHERE not_after < $1 LIMIT $2)",
                )
                .await
                .map_err(pg_err("prune"))?;
            let mut total = 0u64;
            loop {
                let n = client
                    .execute(&stmt, &[&cutoff, &PRUNE_BATCH])
                    .await
                    .map_err(pg_err("prune"))?;
                total = total.saturating_add(n);
                if n < u64::try_from(PRUNE_BATCH).unwrap_or(u64::MAX) {
                    client
                        .execute(
                            "DELETE FROM meshward_revocations WHERE not_after < $1",
                            &[&cutoff],
                        )
                        .await
                        .map_err(pg_err("prune"))?;
                    return Ok(total);
                }
            }
        })
    }

    fn counts_by_namespace(&self, now: OffsetDateTime) -> LedgerFuture<'_, Vec<NamespaceCount>> {
        let now = now.unix_timestamp();
        Box::pin(async move {
            let client = self.client("counts").await?;
            let replica: &str = &self.replica;
            let rows = client
                .query(
                    "SELECT namespace, COUNT(*),
                            COUNT(*) FILTER (WHERE not_before <= $1 AND not_after > $1)
                     FROM meshward_certificates WHERE recorded_by = $2
                     GROUP BY namespace ORDER BY namespace",
                    &[&now, &replica],
                )
                .await
                .map_err(pg_err("counts"))?;
            rows.iter()
                .map(|row| {
                    let recorded: i64 = row.try_get(1).map_err(pg_err("counts"))?;
                    let valid: i64 = row.try_get(2).map_err(pg_err("counts"))?;
                    Ok(NamespaceCount {
                        namespace: row.try_get(0).map_err(pg_err("counts"))?,
                        recorded: u64::try_from(recorded).unwrap_or(0),
                        valid: u64::try_from(valid).unwrap_or(0),
                    })
                })
                .collect()
        })
    }

    fn latest_not_after_issued_before(
        &self,
        before: OffsetDateTime,
    ) -> LedgerFuture<'_, Option<OffsetDateTime>> {
        let before = before.unix_timestamp();
        Box::pin(async move {
            let client = self.client("latest_not_after").await?;
            let row = client
                .query_one(
                    "SELECT MAX(not_after) FROM meshward_certificates WHERE issued_at < $1",
                    &[&before],
                )
                .await
                .map_err(pg_err("latest_not_after"))?;
            let max: Option<i64> = row.try_get(0).map_err(pg_err("latest_not_after"))?;
            max.map(|secs| from_unix("max(not_after)", secs))
                .transpose()
        })
    }

    fn revoke<'a>(
        &'a self,
        target: &'a RevocationTarget,
        reason: RevocationReason,
        now: OffsetDateTime,
    ) -> LedgerFuture<'a, Vec<Revocation>> {
        let now = now.unix_timestamp();
        Box::pin(async move {
            let mut client = self.client("revoke").await?;
            let (clause, key) = target_clause(target);
            let tx = client.transaction().await.map_err(pg_err("revoke"))?;
            tx.execute(
                &format!(
                    "INSERT INTO meshward_revocations ({REVOCATION_COLUMNS})
                     SELECT sha256, serial, spiffe_id, not_after, $2, $3 FROM meshward_certificates
                     WHERE {clause} AND not_after > $2 AND issued_at <= $2
                     ON CONFLICT (sha256) DO NOTHING"
                ),
                &[key.as_ref(), &now, &reason.as_str()],
            )
            .await
            .map_err(pg_err("revoke"))?;
            let rows = tx
                .query(
                    &format!(
                        "SELECT {REVOCATION_COLUMNS} FROM meshward_revocations
                         WHERE {clause} AND not_after > $2 ORDER BY revoked_at, serial"
                    ),
                    &[key.as_ref(), &now],
                )
                .await
                .map_err(pg_err("revoke"))?;
            tx.commit().await.map_err(pg_err("revoke"))?;
            rows_to_revocations(&rows)
        })
    }

    fn unrevoke<'a>(&'a self, target: &'a RevocationTarget) -> LedgerFuture<'a, u64> {
        Box::pin(async move {
            let client = self.client("unrevoke").await?;
            let (clause, key) = target_clause(target);
            client
                .execute(
                    &format!("DELETE FROM meshward_revocations WHERE {clause}"),
                    &[key.as_ref()],
                )
                .await
                .map_err(pg_err("unrevoke"))
        })
    }

    fn revocations(&self, now: OffsetDateTime) -> LedgerFuture<'_, Vec<Revocation>> {
        let now = now.unix_timestamp();
        Box::pin(async move {
            let client = self.client("revocations").await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {REVOCATION_COLUMNS} FROM meshward_revocations
                         WHERE not_after > $1 ORDER BY revoked_at, serial"
                    ),
                    &[&now],
                )
                .await
                .map_err(pg_err("revocations"))?;
            rows_to_revocations(&rows)
        })
    }

    fn revocation(&self, sha256: CertDigest) -> LedgerFuture<'_, Option<Revocation>> {
        Box::pin(async move {
            let client = self.client("revocation").await?;
            let digest: &[u8] = sha256.as_bytes();
            let rows = client
                .query(
                    &format!(
                        "SELECT {REVOCATION_COLUMNS} FROM meshward_revocations WHERE sha256 = $1"
                    ),
                    &[&digest],
                )
                .await
                .map_err(pg_err("revocation"))?;
            Ok(rows_to_revocations(&rows)?.pop())
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::test_postgres as pg_server;

    #[test]
    fn server_states_that_pass_are_told_from_refusals() {
        use tokio_postgres::error::SqlState;
        for passing in [
            SqlState::CANNOT_CONNECT_NOW, // the database system is starting up
            SqlState::ADMIN_SHUTDOWN,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::CONNECTION_FAILURE,
            SqlState::READ_ONLY_SQL_TRANSACTION, // a standby, mid-failover
            SqlState::T_R_SERIALIZATION_FAILURE,
        ] {
            assert!(transient(passing.code()), "{passing:?}");
        }
        for refusal in [
            SqlState::INVALID_PASSWORD,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            SqlState::INVALID_CATALOG_NAME, // no such database
            SqlState::INSUFFICIENT_PRIVILEGE,
            SqlState::UNDEFINED_TABLE,
        ] {
            assert!(!transient(refusal.code()), "{refusal:?}");
        }
    }

    #[tokio::test]
    async fn lookups_holding_every_read_connection_cannot_delay_issuance() {
        let Some(pg) = pg_server::Postgres::start() else {
            return;
        };
        let opts = PostgresOptions {
            url: pg.url("postgres"),
            password_file: Some(pg.password_file()),
            tls: PostgresTls::Disable,
            pool_size: 1,
            connect_timeout: Duration::from_secs(2),
            statement_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(30),
            commit_delay: Duration::ZERO,
            replica: "signer-0".to_string(),
        };
        let ledger = PostgresLedger::open(&opts, None).await.unwrap();
        // A lookup flood has taken the only read connection.
        let held = ledger.pool.get().await.unwrap();
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let rec = IssuanceRecord {
            sha256: CertDigest::of(b"leaf"),
            serial: "01".to_string(),
            spiffe_id: "spiffe://cluster.local/ns/a/sa/b".to_string(),
            namespace: "a".to_string(),
            not_before: now,
            not_after: now,
            backend: "builtin".to_string(),
            caller: "spiffe://cluster.local/ns/a/sa/b".to_string(),
            issued_at: now,
        };
        // The issuance records on the writer's own connections.
        ledger.record(&rec).await.unwrap();
        // Reads wait for their pool (and give up after connect_timeout).
        let err = ledger.lookup(rec.sha256).await.unwrap_err();
        assert!(err.to_string().contains("lookup"), "{err}");
        drop(held);
        assert_eq!(ledger.lookup(rec.sha256).await.unwrap(), Some(rec));
    }
}
