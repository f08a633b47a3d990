//! The default ledger store: one embedded SQLite file, WAL journal,
//! `synchronous=FULL` (a commit is on disk before `record` returns).
//!
//! **Writes** go to one writer thread that owns the write connection and
//! commits in groups: it takes every record waiting (up to
//! [`MAX_GROUP`]) into one transaction and answers each caller only after
//! that transaction's commit — one fsync for the group instead of one per
//! certificate, and still nothing answered before it is on disk. Under load
//! the group grows by itself (records queue while the previous commit
//! syncs), and grows further with `commit_delay` (PostgreSQL's
//! `commit_delay`): when the previous group held more than one record —
//! issuances are arriving concurrently — the writer waits that long before
//! taking the next group. A commit is ~0.6 ms here, so without it a group
//! held ~5 records at 64 concurrent clients, each group an fsync plus its
//! page writes; 1 ms (the default) cut the signer's CPU per certificate by
//! ~12 % and its latency with it. Alone, a record still commits at once
//! (its previous group was one record).
//!
//! **Reads** (lookups by digest, counts, the rotation query) use their own
//! connection on tokio's blocking pool, so a filter's lookup never waits
//! behind a commit (WAL lets readers run beside the writer).
//!
//! **Layout** (schema v2, described in `sqlite/schema.rs`): rows are
//! appended in issuance order to a rowid table, the digest is a 32-byte
//! BLOB with a UNIQUE index, and the other indexes (notAfter, issuedAt,
//! namespace + notAfter) have keys that grow with time, so their inserts
//! share the last pages. A group commit therefore writes about one random
//! page per certificate (the digest index) instead of three. There is no
//! index on serial or SPIFFE ID: those keys are random, each would cost
//! another page write per certificate, and no signer query needs them; a
//! forensic query by serial or SPIFFE ID scans the table. Opening a v1
//! file converts it.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;
use tokio::sync::oneshot;

use super::{
    CertDigest, IssuanceRecord, Ledger, LedgerError, LedgerFuture, LedgerMetrics, NamespaceCount,
    Revocation, RevocationReason, RevocationTarget,
};

mod schema;

const INSERT: &str = "INSERT INTO certificates
   (sha256, serial, spiffe_id, namespace, not_before, not_after, backend, caller, issued_at)
 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
 ON CONFLICT (sha256) DO NOTHING";

const LOOKUP: &str =
    "SELECT serial, spiffe_id, namespace, not_before, not_after, backend, caller, issued_at
 FROM certificates WHERE sha256 = ?1";

/// Most records committed in one transaction.
pub const MAX_GROUP: usize = 512;

/// How to open the SQLite ledger.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Database file (created if missing, with its parent directory).
    pub path: PathBuf,
    /// How long a write waits for a lock held by another connection before
    /// failing (and so failing the issuance).
    pub busy_timeout: Duration,
    /// How long the writer waits for more records before a group commit
    /// while records are arriving concurrently (see the module docs); zero
    /// commits at once.
    pub commit_delay: Duration,
}

type Reply<T> = oneshot::Sender<Result<T, LedgerError>>;

/// Work for the writer thread.
enum Job {
    Record(Box<IssuanceRecord>, Reply<()>),
    Prune(i64, Reply<u64>),
    /// An operator's write (revoke, unrevoke): runs alone, after the
    /// group's records; the closure answers its caller itself.
    Admin(AdminJob),
}

/// An operator's write, run on the writer's connection.
type AdminJob = Box<dyn FnOnce(&mut Connection) + Send>;

/// The SQLite ledger.
#[derive(Debug, Clone)]
pub struct SqliteLedger {
    writer: mpsc::Sender<Job>,
    reader: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl SqliteLedger {
    /// Open (or create) the database, switch it to WAL, create the schema
    /// and start the writer thread (it ends when the last clone is dropped).
    pub fn open(opts: &SqliteOptions) -> Result<Self, LedgerError> {
        Self::open_observed(opts, None)
    }

    /// [`SqliteLedger::open`], the writer thread reporting each group commit
    /// (size, duration) to `metrics`.
    pub fn open_observed(
        opts: &SqliteOptions,
        metrics: Option<Arc<LedgerMetrics>>,
    ) -> Result<Self, LedgerError> {
        let open_err = |reason: String| LedgerError::Open {
            path: opts.path.display().to_string(),
            reason,
        };
        if let Some(parent) = opts.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| open_err(format!("creating {}: {e}", parent.display())))?;
        }
        let mut conn = Connection::open(&opts.path).map_err(|e| open_err(e.to_string()))?;
        conn.busy_timeout(opts.busy_timeout)
            .map_err(|e| open_err(e.to_string()))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| open_err(format!("enabling WAL: {e}")))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(open_err(format!("journal mode is {mode}, WAL refused")));
        }
        // synchronous=FULL: a commit is on disk before anyone is answered.
        //
        // A 2 MiB page cache (SQLite's default size): at every commit
        // SQLite walks the cache's whole hash table (`pcache1Truncate`), 5-7 %
        // of this thread with the 64 MiB cache used before; and the one
        // random index (the digest) misses any cache smaller than the
        // ledger anyway, those pages come from the OS page cache. Measured
        // on the load bench and with a 500 000-record file: 64 MiB was never
        // faster, 2, 4 and 8 MiB were equal.
        //
        // Checkpoint every 8 000 WAL pages (32 MiB) instead of 1 000: a
        // digest-index leaf rewritten by many groups is copied into the
        // database once per checkpoint, so with a large ledger the writer
        // spends ~15 % less CPU per record than at 1 000 (16 000 gained a
        // little more, for a 64 MiB WAL).
        conn.execute_batch(
            "PRAGMA synchronous=FULL; PRAGMA cache_size=-2048; PRAGMA wal_autocheckpoint=8000;",
        )
        .map_err(|e| open_err(e.to_string()))?;
        let started = Instant::now();
        match schema::ensure_current(&mut conn).map_err(|e| open_err(e.to_string()))? {
            schema::Opened::Migrated { records } => tracing::info!(
                path = %opts.path.display(),
                records,
                took = ?started.elapsed(),
                "ledger converted from schema v1 to v{}",
                schema::CURRENT
            ),
            schema::Opened::Created => tracing::debug!(
                path = %opts.path.display(),
                "ledger created at schema v{}",
                schema::CURRENT
            ),
            schema::Opened::Current => {}
        }

        let reader = Connection::open(&opts.path).map_err(|e| open_err(e.to_string()))?;
        reader
            .busy_timeout(opts.busy_timeout)
            .map_err(|e| open_err(e.to_string()))?;
        // The reader's cache is emptied whenever it starts a read after the
        // writer committed (WAL), so under load a large one buys nothing.
        reader
            .execute_batch("PRAGMA query_only=1; PRAGMA cache_size=-2048;")
            .map_err(|e| open_err(e.to_string()))?;

        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("ledger-writer".to_string())
            .spawn({
                let commit_delay = opts.commit_delay;
                move || writer_loop(conn, &rx, metrics.as_deref(), commit_delay)
            })
            .map_err(|e| open_err(format!("starting the writer thread: {e}")))?;
        Ok(Self {
            writer: tx,
            reader: Arc::new(Mutex::new(reader)),
            path: opts.path.clone(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Up to `limit` records in issuance order after row `after` (0: from
    /// the first), each with its row id: how `ledger import` reads a file.
    pub async fn records_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<(i64, IssuanceRecord)>, LedgerError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read("export", move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, sha256, serial, spiffe_id, namespace, not_before, not_after,
                            backend, caller, issued_at
                     FROM certificates WHERE id > ?1 ORDER BY id LIMIT ?2",
                )
                .map_err(store_err("export"))?;
            let rows = stmt
                .query_map(params![after, limit], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        record_columns(r, 2)?,
                    ))
                })
                .map_err(store_err("export"))?;
            let mut out = Vec::new();
            for row in rows {
                let (id, digest, row) = row.map_err(store_err("export"))?;
                let digest: [u8; 32] =
                    digest
                        .try_into()
                        .map_err(|d: Vec<u8>| LedgerError::Corrupt {
                            sha256: hex::encode(&d),
                            reason: format!("digest of {} bytes", d.len()),
                        })?;
                out.push((id, row_to_record(CertDigest::from_bytes(digest), row)?));
            }
            Ok(out)
        })
        .await
    }

    async fn read<T, F>(&self, op: &'static str, f: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        let conn = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().map_err(|_| LedgerError::Store {
                op,
                reason: "connection lock poisoned".to_string(),
            })?;
            f(&conn)
        })
        .await
        .map_err(|e| LedgerError::Store {
            op,
            reason: format!("blocking task failed: {e}"),
        })?
    }

    async fn write<T>(
        &self,
        op: &'static str,
        job: impl FnOnce(Reply<T>) -> Job,
    ) -> Result<T, LedgerError> {
        let gone = || LedgerError::Store {
            op,
            reason: "the ledger writer thread has stopped".to_string(),
        };
        let (reply, answer) = oneshot::channel();
        self.writer.send(job(reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// The jobs of one turn of the writer.
#[derive(Default)]
struct Group {
    records: Vec<(Box<IssuanceRecord>, Reply<()>)>,
    prunes: Vec<(i64, Reply<u64>)>,
    admin: Vec<AdminJob>,
}

impl Group {
    fn len(&self) -> usize {
        self.records.len() + self.prunes.len() + self.admin.len()
    }

    fn push(&mut self, job: Job) {
        match job {
            Job::Record(rec, reply) => self.records.push((rec, reply)),
            Job::Prune(cutoff, reply) => self.prunes.push((cutoff, reply)),
            Job::Admin(job) => self.admin.push(job),
        }
    }

    /// Adds every job already waiting, up to [`MAX_GROUP`].
    fn take_waiting(&mut self, rx: &mpsc::Receiver<Job>) {
        while self.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(job) => self.push(job),
                Err(_) => return,
            }
        }
    }
}

/// The next group: `first` and every job waiting; when the previous group
/// committed more than one record and `commit_delay` is set, also every job
/// that arrives within `commit_delay` (one sleep, not a wake-up per record).
fn collect_group(
    first: Job,
    rx: &mpsc::Receiver<Job>,
    previous_records: usize,
    commit_delay: Duration,
) -> Group {
    let mut group = Group::default();
    group.push(first);
    group.take_waiting(rx);
    if previous_records > 1 && !commit_delay.is_zero() && group.len() < MAX_GROUP {
        std::thread::sleep(commit_delay);
        group.take_waiting(rx);
    }
    group
}

/// The writer thread: one group commit per turn.
fn writer_loop(
    mut conn: Connection,
    rx: &mpsc::Receiver<Job>,
    metrics: Option<&LedgerMetrics>,
    commit_delay: Duration,
) {
    let mut previous_records = 0;
    while let Ok(first) = rx.recv() {
        let Group {
            records,
            prunes,
            admin,
        } = collect_group(first, rx, previous_records, commit_delay);
        previous_records = records.len();
        if !records.is_empty() {
            let (n, started) = (records.len(), Instant::now());
            let answers = commit_group(&mut conn, records);
            // Measured before anyone hears back: a caller that reads the
            // metrics after its answer sees its commit.
            if let Some(m) = metrics {
                m.committed(n, started.elapsed().as_secs_f64());
            }
            for (reply, answer) in answers {
                let _ = reply.send(answer);
            }
        }
        for (cutoff, reply) in prunes {
            let _ = reply.send(prune(&conn, cutoff));
        }
        for job in admin {
            job(&mut conn);
        }
    }
}

/// Insert every record in one transaction; each caller's answer is `Ok`
/// only if its insert succeeded and the commit is durable. The answers are
/// returned, for the writer to send once the commit is measured.
fn commit_group(
    conn: &mut Connection,
    records: Vec<(Box<IssuanceRecord>, Reply<()>)>,
) -> Vec<(Reply<()>, Result<(), LedgerError>)> {
    // `rusqlite::Error` is not `Clone`: a group failure reaches every
    // caller as the same message.
    let fail_all = |replies: Vec<Reply<()>>, e: &rusqlite::Error| {
        replies
            .into_iter()
            .map(|reply| {
                let answer = Err(LedgerError::Store {
                    op: "record",
                    reason: e.to_string(),
                });
                (reply, answer)
            })
            .collect::<Vec<_>>()
    };
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return fail_all(records.into_iter().map(|(_, r)| r).collect(), &e),
    };
    let mut inserted = Vec::with_capacity(records.len());
    let mut answers = Vec::new();
    {
        let mut stmt = match tx.prepare_cached(INSERT) {
            Ok(stmt) => stmt,
            Err(e) => return fail_all(records.into_iter().map(|(_, r)| r).collect(), &e),
        };
        for (rec, reply) in records {
            match stmt.execute(params![
                rec.sha256.as_bytes(),
                rec.serial,
                rec.spiffe_id,
                rec.namespace,
                rec.not_before.unix_timestamp(),
                rec.not_after.unix_timestamp(),
                rec.backend,
                rec.caller,
                rec.issued_at.unix_timestamp(),
            ]) {
                Ok(_) => inserted.push(reply),
                Err(e) => answers.push((reply, Err(store_err("record")(e)))),
            }
        }
    }
    match tx.commit() {
        Ok(()) => answers.extend(inserted.into_iter().map(|reply| (reply, Ok(())))),
        Err(e) => answers.extend(fail_all(inserted, &e)),
    }
    answers
}

fn prune(conn: &Connection, cutoff: i64) -> Result<u64, LedgerError> {
    let n = conn
        .execute(
            "DELETE FROM certificates WHERE not_after < ?1",
            params![cutoff],
        )
        .map_err(store_err("prune"))?;
    conn.execute(
        "DELETE FROM revocations WHERE not_after < ?1",
        params![cutoff],
    )
    .map_err(store_err("prune"))?;
    Ok(u64::try_from(n).unwrap_or(u64::MAX))
}

/// The certificates a target names, as `WHERE` over `certificates`.
fn target_clause(target: &RevocationTarget) -> (&'static str, rusqlite::types::Value) {
    use rusqlite::types::Value;
    match target {
        RevocationTarget::Sha256(d) => ("sha256 = ?1", Value::Blob(d.as_bytes().to_vec())),
        RevocationTarget::Serial(s) => ("serial = ?1", Value::Text(s.clone())),
        RevocationTarget::SpiffeId(id) => ("spiffe_id = ?1", Value::Text(id.clone())),
    }
}

/// Revoke in one transaction, then read back what is in effect.
fn revoke(
    conn: &mut Connection,
    target: &RevocationTarget,
    reason: RevocationReason,
    now: i64,
) -> Result<Vec<Revocation>, LedgerError> {
    let (clause, key) = target_clause(target);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(store_err("revoke"))?;
    tx.execute(
        &format!(
            "INSERT INTO revocations (sha256, serial, spiffe_id, not_after, revoked_at, reason)
             SELECT sha256, serial, spiffe_id, not_after, ?2, ?3 FROM certificates
             WHERE {clause} AND not_after > ?2 AND issued_at <= ?2
             ON CONFLICT (sha256) DO NOTHING"
        ),
        params![key, now, reason.as_str()],
    )
    .map_err(store_err("revoke"))?;
    let out = select_revocations(
        &tx,
        &format!(
            "SELECT r.sha256, r.serial, r.spiffe_id, r.not_after, r.revoked_at, r.reason
             FROM revocations r WHERE r.{clause} AND r.not_after > ?2 ORDER BY r.revoked_at, r.serial"
        ),
        params![key, now],
    )?;
    tx.commit().map_err(store_err("revoke"))?;
    Ok(out)
}

fn select_revocations(
    conn: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> Result<Vec<Revocation>, LedgerError> {
    let mut stmt = conn.prepare_cached(sql).map_err(store_err("revocations"))?;
    let rows = stmt
        .query_map(args, |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
            ))
        })
        .map_err(store_err("revocations"))?;
    let mut out = Vec::new();
    for row in rows {
        let (digest, serial, spiffe_id, not_after, revoked_at, reason) =
            row.map_err(store_err("revocations"))?;
        out.push(revocation_row(
            &digest, serial, spiffe_id, not_after, revoked_at, &reason,
        )?);
    }
    Ok(out)
}

/// A stored revocation row, checked.
pub(super) fn revocation_row(
    digest: &[u8],
    serial: String,
    spiffe_id: String,
    not_after: i64,
    revoked_at: i64,
    reason: &str,
) -> Result<Revocation, LedgerError> {
    let bytes: [u8; 32] = digest.try_into().map_err(|_| LedgerError::Corrupt {
        sha256: hex::encode(digest),
        reason: format!("revocation digest of {} bytes", digest.len()),
    })?;
    let sha256 = CertDigest::from_bytes(bytes);
    Ok(Revocation {
        sha256,
        serial,
        spiffe_id,
        not_after: from_unix(sha256, not_after)?,
        revoked_at: from_unix(sha256, revoked_at)?,
        reason: reason
            .parse()
            .map_err(|e: super::revocation::BadTarget| LedgerError::Corrupt {
                sha256: sha256.to_hex(),
                reason: e.to_string(),
            })?,
    })
}

fn store_err(op: &'static str) -> impl Fn(rusqlite::Error) -> LedgerError {
    move |e| LedgerError::Store {
        op,
        reason: e.to_string(),
    }
}

fn from_unix(sha256: CertDigest, secs: i64) -> Result<OffsetDateTime, LedgerError> {
    OffsetDateTime::from_unix_timestamp(secs).map_err(|e| LedgerError::Corrupt {
        sha256: sha256.to_hex(),
        reason: format!("timestamp {secs}: {e}"),
    })
}

/// A row of [`LOOKUP`] (the digest is the lookup key, not read back).
type Row = (String, String, String, i64, i64, String, String, i64);

/// The [`Row`] columns (serial … issued_at, in [`LOOKUP`]'s order) of a
/// result row, starting at column `first`.
fn record_columns(r: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Row> {
    Ok((
        r.get(first)?,
        r.get(first + 1)?,
        r.get(first + 2)?,
        r.get(first + 3)?,
        r.get(first + 4)?,
        r.get(first + 5)?,
        r.get(first + 6)?,
        r.get(first + 7)?,
    ))
}

fn row_to_record(sha256: CertDigest, row: Row) -> Result<IssuanceRecord, LedgerError> {
    let (serial, spiffe_id, namespace, nb, na, backend, caller, at) = row;
    Ok(IssuanceRecord {
        sha256,
        serial,
        spiffe_id,
        namespace,
        not_before: from_unix(sha256, nb)?,
        not_after: from_unix(sha256, na)?,
        backend,
        caller,
        issued_at: from_unix(sha256, at)?,
    })
}

impl SqliteLedger {
    /// Run `f` on the writer's connection (alone, after the group it
    /// arrives with) and wait for its answer.
    async fn admin<T, F>(&self, op: &'static str, f: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        self.write(op, move |reply| {
            Job::Admin(Box::new(move |conn| {
                let _ = reply.send(f(conn));
            }))
        })
        .await
    }
}

impl Ledger for SqliteLedger {
    fn record<'a>(&'a self, rec: &'a IssuanceRecord) -> LedgerFuture<'a, ()> {
        let rec = Box::new(rec.clone());
        Box::pin(self.write("record", move |reply| Job::Record(rec, reply)))
    }

    fn lookup(&self, sha256: CertDigest) -> LedgerFuture<'_, Option<IssuanceRecord>> {
        Box::pin(self.read("lookup", move |conn| {
            let mut stmt = conn.prepare_cached(LOOKUP).map_err(store_err("lookup"))?;
            let row: Option<Row> = stmt
                .query_row(params![sha256.as_bytes()], |r| record_columns(r, 0))
                .optional()
                .map_err(store_err("lookup"))?;
            row.map(|row| row_to_record(sha256, row)).transpose()
        }))
    }

    fn prune(&self, now: OffsetDateTime, retention: Duration) -> LedgerFuture<'_, u64> {
        let cutoff = now
            .unix_timestamp()
            .saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
        Box::pin(self.write("prune", move |reply| Job::Prune(cutoff, reply)))
    }

    fn counts_by_namespace(&self, now: OffsetDateTime) -> LedgerFuture<'_, Vec<NamespaceCount>> {
        let now = now.unix_timestamp();
        Box::pin(self.read("counts", move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT namespace, COUNT(*),
                            SUM(CASE WHEN not_before <= ?1 AND not_after > ?1 THEN 1 ELSE 0 END)
                     FROM certificates GROUP BY namespace ORDER BY namespace",
                )
                .map_err(store_err("counts"))?;
            let rows = stmt
                .query_map(params![now], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(store_err("counts"))?;
            let mut out = Vec::new();
            for row in rows {
                let (namespace, recorded, valid) = row.map_err(store_err("counts"))?;
                out.push(NamespaceCount {
                    namespace,
                    recorded: u64::try_from(recorded).unwrap_or(0),
                    valid: u64::try_from(valid).unwrap_or(0),
                });
            }
            Ok(out)
        }))
    }

    fn latest_not_after_issued_before(
        &self,
        before: OffsetDateTime,
    ) -> LedgerFuture<'_, Option<OffsetDateTime>> {
        let before = before.unix_timestamp();
        Box::pin(self.read("latest_not_after", move |conn| {
            let max: Option<i64> = conn
                .prepare_cached("SELECT MAX(not_after) FROM certificates WHERE issued_at < ?1")
                .and_then(|mut stmt| stmt.query_row(params![before], |r| r.get(0)))
                .map_err(store_err("latest_not_after"))?;
            max.map(|secs| {
                OffsetDateTime::from_unix_timestamp(secs).map_err(|e| LedgerError::Corrupt {
                    sha256: "max(not_after)".to_string(),
                    reason: format!("timestamp {secs}: {e}"),
                })
            })
            .transpose()
        }))
    }

    fn revoke<'a>(
        &'a self,
        target: &'a RevocationTarget,
        reason: RevocationReason,
        now: OffsetDateTime,
    ) -> LedgerFuture<'a, Vec<Revocation>> {
        let target = target.clone();
        let now = now.unix_timestamp();
        Box::pin(self.admin("revoke", move |conn| revoke(conn, &target, reason, now)))
    }

    fn unrevoke<'a>(&'a self, target: &'a RevocationTarget) -> LedgerFuture<'a, u64> {
        let target = target.clone();
        Box::pin(self.admin("unrevoke", move |conn| {
            let (clause, key) = target_clause(&target);
            let n = conn
                .execute(&format!("DELETE FROM revocations WHERE {clause}"), [key])
                .map_err(store_err("unrevoke"))?;
            Ok(u64::try_from(n).unwrap_or(u64::MAX))
        }))
    }

    fn revocations(&self, now: OffsetDateTime) -> LedgerFuture<'_, Vec<Revocation>> {
        let now = now.unix_timestamp();
        Box::pin(self.read("revocations", move |conn| {
            select_revocations(
                conn,
                "SELECT sha256, serial, spiffe_id, not_after, revoked_at, reason
                 FROM revocations WHERE not_after > ?1 ORDER BY revoked_at, serial",
                params![now],
            )
        }))
    }

    fn revocation(&self, sha256: CertDigest) -> LedgerFuture<'_, Option<Revocation>> {
        Box::pin(self.read("revocation", move |conn| {
            Ok(select_revocations(
                conn,
                "SELECT sha256, serial, spiffe_id, not_after, revoked_at, reason
                 FROM revocations WHERE sha256 = ?1",
                params![sha256.as_bytes()],
            )?
            .pop())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(byte: u8, ns: &str, not_after: i64, issued_at: i64) -> IssuanceRecord {
        IssuanceRecord {
            sha256: CertDigest::of(&[byte]),
            serial: format!("{byte:02x}"),
            spiffe_id: format!("spiffe://td/ns/{ns}/sa/s{byte}"),
            namespace: ns.to_string(),
            not_before: OffsetDateTime::from_unix_timestamp(not_after - 86_400).unwrap(),
            not_after: OffsetDateTime::from_unix_timestamp(not_after).unwrap(),
            backend: "builtin".to_string(),
            caller: "spiffe://td/ns/x/sa/y".to_string(),
            issued_at: OffsetDateTime::from_unix_timestamp(issued_at).unwrap(),
        }
    }

    fn open(dir: &tempfile::TempDir) -> SqliteLedger {
        SqliteLedger::open(&SqliteOptions {
            path: dir.path().join("ledger.sqlite"),
            busy_timeout: Duration::from_millis(100),
            commit_delay: Duration::ZERO,
        })
        .unwrap()
    }

    fn job(byte: u8) -> (Job, oneshot::Receiver<Result<(), LedgerError>>) {
        let (reply, answer) = oneshot::channel();
        (Job::Record(Box::new(rec(byte, "a", 10, 0)), reply), answer)
    }

    /// Sends `job` on `tx` after `after`, from another thread.
    fn send_later(
        tx: &mpsc::Sender<Job>,
        job: Job,
        after: Duration,
    ) -> std::thread::JoinHandle<()> {
        let tx = tx.clone();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            tx.send(job).unwrap();
        })
    }

    #[test]
    fn concurrent_issuances_wait_the_commit_delay_to_share_one_commit() {
        let (tx, rx) = mpsc::channel();
        let (first, _a) = job(1);
        let (waiting, _b) = job(2);
        let (late, _c) = job(3);
        tx.send(waiting).unwrap();
        let sender = send_later(&tx, late, Duration::from_millis(20));
        // The previous group committed 2 records: issuances are concurrent.
        let group = collect_group(first, &rx, 2, Duration::from_millis(500));
        sender.join().unwrap();
        assert_eq!(group.records.len(), 3);
    }

    #[test]
    fn a_lone_issuance_commits_without_waiting() {
        for (previous, delay) in [(1, Duration::from_secs(5)), (5, Duration::ZERO)] {
            let (tx, rx) = mpsc::channel();
            let (first, _a) = job(1);
            let (late, _b) = job(2);
            let sender = send_later(&tx, late, Duration::from_millis(100));
            let group = collect_group(first, &rx, previous, delay);
            assert_eq!(
                group.records.len(),
                1,
                "previous {previous}, delay {delay:?}"
            );
            sender.join().unwrap();
            assert!(
                rx.try_recv().is_ok(),
                "the late record waits for the next group"
            );
        }
    }

    #[test]
    fn a_group_never_exceeds_max_group() {
        let (tx, rx) = mpsc::channel();
        let mut answers = Vec::new();
        for i in 0..MAX_GROUP + 5 {
            let (j, a) = job((i % 251) as u8);
            tx.send(j).unwrap();
            answers.push(a);
        }
        let (first, _a) = job(0);
        let group = collect_group(first, &rx, 10, Duration::from_millis(1));
        assert_eq!(group.len(), MAX_GROUP);
    }

    #[tokio::test]
    async fn group_commits_are_measured() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(LedgerMetrics::new(10));
        let l = SqliteLedger::open_observed(
            &SqliteOptions {
                path: dir.path().join("ledger.sqlite"),
                busy_timeout: Duration::from_millis(100),
                commit_delay: Duration::ZERO,
            },
            Some(metrics.clone()),
        )
        .unwrap();
        let (a, b, c) = (rec(1, "a", 10, 0), rec(2, "a", 10, 0), rec(3, "b", 10, 0));
        let (ra, rb, rc) = tokio::join!(l.record(&a), l.record(&b), l.record(&c));
        ra.unwrap();
        rb.unwrap();
        rc.unwrap();
        let mut reg = prometheus_client::registry::Registry::with_prefix("meshward_signer");
        metrics.register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        // Three records in one to three transactions, every one measured.
        assert!(
            out.contains("meshward_signer_ledger_commit_group_size_sum 3.0"),
            "{out}"
        );
        assert!(
            out.contains("meshward_signer_ledger_commit_duration_seconds_count"),
            "{out}"
        );
        for sha in [a.sha256, b.sha256, c.sha256] {
            assert!(l.lookup(sha).await.unwrap().is_some());
        }
    }

    #[tokio::test]
    async fn prune_keeps_records_within_retention_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(&dir);
        let now = 1_000_000_i64;
        l.record(&rec(1, "a", now - 10_000, 0)).await.unwrap(); // expired long ago
        l.record(&rec(2, "a", now - 100, 0)).await.unwrap(); // expired recently
        l.record(&rec(3, "b", now + 100, 0)).await.unwrap(); // valid
        let n = l
            .prune(
                OffsetDateTime::from_unix_timestamp(now).unwrap(),
                Duration::from_secs(1_000),
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert!(l.lookup(CertDigest::of(&[1])).await.unwrap().is_none());
        assert!(l.lookup(CertDigest::of(&[2])).await.unwrap().is_some());
        assert!(l.lookup(CertDigest::of(&[3])).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn counts_group_by_namespace_and_validity() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(&dir);
        let now = 1_000_000_i64;
        l.record(&rec(1, "a", now - 10, 0)).await.unwrap();
        l.record(&rec(2, "a", now + 10, 0)).await.unwrap();
        l.record(&rec(3, "b", now + 10, 0)).await.unwrap();
        let counts = l
            .counts_by_namespace(OffsetDateTime::from_unix_timestamp(now).unwrap())
            .await
            .unwrap();
        assert_eq!(
            counts,
            vec![
                NamespaceCount {
                    namespace: "a".into(),
                    recorded: 2,
                    valid: 1
                },
                NamespaceCount {
                    namespace: "b".into(),
                    recorded: 1,
                    valid: 1
                },
            ]
        );
    }

    #[tokio::test]
    async fn journal_is_wal_and_indexes_exist() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(&dir);
        drop(l);
        let conn = Connection::open(dir.path().join("ledger.sqlite")).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, schema::CURRENT);
        assert_eq!(
            index_columns(&conn),
            vec![
                "UNIQUE sha256".to_string(),
                "issued_at".to_string(),
                "namespace,not_after".to_string(),
                "not_after".to_string(),
            ],
            "only the digest and time-ordered keys are indexed (no serial, no SPIFFE ID)"
        );
    }

    /// Every index on `certificates` as its columns (`UNIQUE ` in front of
    /// a unique one), sorted.
    fn index_columns(conn: &Connection) -> Vec<String> {
        let mut stmt = conn
            .prepare(
                "SELECT il.\"unique\", group_concat(ii.name, ',')
                 FROM pragma_index_list('certificates') AS il,
                      pragma_index_info(il.name) AS ii
                 GROUP BY il.name",
            )
            .unwrap();
        let mut out: Vec<String> = stmt
            .query_map([], |r| {
                let unique: bool = r.get(0)?;
                let cols: String = r.get(1)?;
                Ok(if unique {
                    format!("UNIQUE {cols}")
                } else {
                    cols
                })
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        out.sort();
        out
    }

    /// The schema of signers before schema versions, verbatim.
    const V1_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS certificates (
    sha256     TEXT PRIMARY KEY NOT NULL,
    serial     TEXT NOT NULL,
    spiffe_id  TEXT NOT NULL,
    namespace  TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after  INTEGER NOT NULL,
    backend    TEXT NOT NULL,
    caller     TEXT NOT NULL,
    issued_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS certificates_not_after ON certificates (not_after);
CREATE INDEX IF NOT EXISTS certificates_namespace ON certificates (namespace, not_after);
CREATE INDEX IF NOT EXISTS certificates_spiffe_id ON certificates (spiffe_id);
CREATE INDEX IF NOT EXISTS certificates_serial ON certificates (serial);
CREATE INDEX IF NOT EXISTS certificates_issued_at ON certificates (issued_at);
";

    /// A ledger file as a v1 signer left it, holding `records`.
    fn write_v1(path: &Path, records: &[IssuanceRecord]) {
        let conn = Connection::open(path).unwrap();
        let _: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        conn.execute_batch(V1_SCHEMA).unwrap();
        for rec in records {
            conn.execute(
                "INSERT INTO certificates
                   (sha256, serial, spiffe_id, namespace, not_before, not_after, backend, caller, issued_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (sha256) DO NOTHING",
                params![
                    rec.sha256.to_hex(),
                    rec.serial,
                    rec.spiffe_id,
                    rec.namespace,
                    rec.not_before.unix_timestamp(),
                    rec.not_after.unix_timestamp(),
                    rec.backend,
                    rec.caller,
                    rec.issued_at.unix_timestamp(),
                ],
            )
            .unwrap();
        }
    }

    fn count_rows(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM certificates", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn v1_ledger_is_migrated_and_every_record_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        let now = 1_000_000_i64;
        // Digest order differs from issuance order: v2 ids must follow
        // issuance.
        let old: Vec<IssuanceRecord> = (1..=40u8)
            .map(|b| {
                rec(
                    b,
                    ["a", "b", "c"][usize::from(b % 3)],
                    now + 100,
                    1_000 - i64::from(b),
                )
            })
            .collect();
        write_v1(&path, &old);

        let l = open(&dir);
        for want in &old {
            let got = l.lookup(want.sha256).await.unwrap();
            assert_eq!(got.as_ref(), Some(want), "record {}", want.sha256);
        }
        assert_eq!(count_rows(&path), 40);
        let counts = l
            .counts_by_namespace(OffsetDateTime::from_unix_timestamp(now).unwrap())
            .await
            .unwrap();
        assert_eq!(counts.iter().map(|c| c.recorded).sum::<u64>(), 40);
        assert_eq!(
            l.latest_not_after_issued_before(OffsetDateTime::from_unix_timestamp(2_000).unwrap())
                .await
                .unwrap()
                .map(OffsetDateTime::unix_timestamp),
            Some(now + 100)
        );
        // The converted keys are the raw digests: recording a migrated
        // certificate again is still a no-op, a new one is appended.
        l.record(&old[0]).await.unwrap();
        l.record(&rec(200, "a", now + 100, 2_000)).await.unwrap();
        assert_eq!(count_rows(&path), 41);
        drop(l);

        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, schema::CURRENT);
        assert!(!index_columns(&conn).iter().any(|i| i == "serial"));
        let issued_in_id_order: Vec<i64> = conn
            .prepare("SELECT issued_at FROM certificates ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(issued_in_id_order.is_sorted(), "{issued_in_id_order:?}");
        let texts: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM certificates WHERE typeof(sha256) != 'blob' OR length(sha256) != 32",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(texts, 0, "every key is 32 raw bytes");
    }

    #[tokio::test]
    async fn ledger_with_an_unknown_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        drop(open(&dir));
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA user_version = 3")
            .unwrap();
        let err = SqliteLedger::open(&SqliteOptions {
            path,
            busy_timeout: Duration::from_millis(100),
            commit_delay: Duration::ZERO,
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("schema version 3 is unknown"),
            "error names the version: {err}"
        );
    }

    #[tokio::test]
    async fn v1_ledger_with_a_malformed_digest_is_refused_and_left_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite");
        write_v1(&path, &[rec(1, "a", 10, 0)]);
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO certificates VALUES ('not-hex', '01', 'spiffe://td/ns/a/sa/b', 'a', 0, 10, 'builtin', 'x', 0)",
                [],
            )
            .unwrap();
        let err = SqliteLedger::open(&SqliteOptions {
            path: path.clone(),
            busy_timeout: Duration::from_millis(100),
            commit_delay: Duration::ZERO,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"not-hex\""), "error names the row: {err}");
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 0, "still v1");
        assert_eq!(count_rows(&path), 2);
    }

    #[tokio::test]
    async fn recording_the_same_certificate_twice_keeps_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(&dir);
        let r = rec(7, "a", 10, 0);
        l.record(&r).await.unwrap();
        l.record(&r).await.unwrap();
        drop(l);
        assert_eq!(count_rows(&dir.path().join("ledger.sqlite")), 1);
    }

    #[tokio::test]
    async fn latest_not_after_considers_only_earlier_issuance() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(&dir);
        l.record(&rec(1, "a", 5_000, 100)).await.unwrap();
        l.record(&rec(2, "a", 9_000, 300)).await.unwrap();
        let t = |s| OffsetDateTime::from_unix_timestamp(s).unwrap();
        assert_eq!(
            l.latest_not_after_issued_before(t(200)).await.unwrap(),
            Some(t(5_000))
        );
        assert_eq!(
            l.latest_not_after_issued_before(t(400)).await.unwrap(),
            Some(t(9_000))
        );
        assert_eq!(l.latest_not_after_issued_before(t(50)).await.unwrap(), None);
    }
}
