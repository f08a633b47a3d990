//! The SQLite ledger's schema, its version (`PRAGMA user_version`) and the
//! upgrade from older layouts.
//!
//! **v2** (current, `user_version = 2`): a rowid table, rows appended in
//! issuance order, the digest stored as its 32 raw bytes:
//!
//! ```sql
//! certificates (id INTEGER PRIMARY KEY, sha256 BLOB NOT NULL UNIQUE,
//!               serial, spiffe_id, namespace, not_before, not_after,
//!               backend, caller, issued_at)
//! indexes: UNIQUE (sha256), (namespace, not_after), (not_after), (issued_at)
//! ```
//!
//! Every index costs a page write per certificate wherever its key lands,
//! and a key that does not grow with time (a digest, a serial, a SPIFFE ID)
//! lands on a random leaf page: one more 4 KiB page in the write-ahead log
//! for each certificate, however many certificates a group commit carries.
//! So the ledger keeps only the indexes a signer query needs or whose keys
//! grow with time (appends share the last page): the digest (the lookup key,
//! and what makes recording idempotent), notAfter (pruning), issuedAt (the
//! rotation's query), namespace + notAfter (the per-namespace counts; few
//! namespaces, so few hot pages). There is **no index on serial or SPIFFE
//! ID**: a forensic query by either (`sqlite3 ledger.sqlite "SELECT ... WHERE
//! serial = '...'"`) scans the table, which is fine for an operator's
//! one-off question and would cost every issuance a random page write if
//! indexed.
//!
//! **v1** (signers before schema versions, `user_version = 0`): a `WITHOUT
//! ROWID` table keyed by the digest as 64 hex characters, indexes on
//! notAfter, namespace + notAfter, SPIFFE ID, serial and issuedAt. Opening
//! a v1 file converts it to v2 in one transaction (every row copied in
//! issuance order, `unhex()` turning the key into bytes), so nothing
//! recorded before the upgrade is lost; if any step fails nothing changes.
//! A version this signer does not know (written by a newer signer) is
//! refused rather than misread. A v2 file must not be opened by a signer
//! older than v2: it would not see the version and write hex keys into it.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

/// The schema version this signer writes.
pub const CURRENT: i64 = 2;

/// The v2 table. `id` is the rowid: SQLite gives each new row the largest
/// id plus one, so rows are appended to the table's last page.
const V2_TABLE: &str = "
CREATE TABLE certificates (
    id         INTEGER PRIMARY KEY,
    sha256     BLOB NOT NULL UNIQUE,
    serial     TEXT NOT NULL,
    spiffe_id  TEXT NOT NULL,
    namespace  TEXT NOT NULL,
    not_before INTEGER NOT NULL,
    not_after  INTEGER NOT NULL,
    backend    TEXT NOT NULL,
    caller     TEXT NOT NULL,
    issued_at  INTEGER NOT NULL
);";

/// The v2 secondary indexes (the UNIQUE one on sha256 comes with the table).
const V2_INDEXES: &str = "
CREATE INDEX certificates_namespace ON certificates (namespace, not_after);
CREATE INDEX certificates_not_after ON certificates (not_after);
CREATE INDEX certificates_issued_at ON certificates (issued_at);";

/// Revocations (`ledger/revocation.rs`): one row per revoked certificate,
/// keyed by its digest. Created on every open if missing, so a v2 file
/// written before revocations existed gains the table without a version
/// change (a signer that predates it ignores the table: it would not refuse
/// revoked certificates, so do not roll back past revocations while any are
/// in effect).
const REVOCATIONS: &str = "
CREATE TABLE IF NOT EXISTS revocations (
    sha256     BLOB PRIMARY KEY,
    serial     TEXT NOT NULL,
    spiffe_id  TEXT NOT NULL,
    not_after  INTEGER NOT NULL,
    revoked_at INTEGER NOT NULL,
    reason     TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS revocations_not_after ON revocations (not_after);";

/// The v1 columns, in table order (what a v1 file must look like before it
/// is converted).
const V1_COLUMNS: [&str; 9] = [
    "sha256",
    "serial",
    "spiffe_id",
    "namespace",
    "not_before",
    "not_after",
    "backend",
    "caller",
    "issued_at",
];

/// What opening found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// An empty database: the v2 schema was created.
    Created,
    /// Already v2.
    Current,
    /// A v1 ledger, converted to v2 with this many records.
    Migrated {
        /// Records copied.
        records: u64,
    },
}

/// Why the schema could not be created or upgraded.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// `user_version` names a schema this signer does not know.
    #[error(
        "ledger schema version {found} is unknown to this signer (it reads v1 and v2 and writes \
         v{CURRENT}); a newer signer probably wrote it: refusing to open it rather than misread it \
         (run the newer signer, or point ledger.path at another file)"
    )]
    UnknownVersion {
        /// The file's `user_version`.
        found: i64,
    },
    /// The file has a `certificates` table, no version, and not the v1
    /// columns: it is not a ledger this signer wrote.
    #[error(
        "table `certificates` has no schema version and is not the v1 ledger layout \
         (columns: {columns}); refusing to touch it"
    )]
    NotALedger {
        /// The columns found.
        columns: String,
    },
    /// A v1 row's key is not 64 hex digits: converting it would lose it.
    #[error(
        "the v1 ledger holds a row whose sha256 is not 64 hex digits ({sha256:?}); \
         nothing was converted"
    )]
    BadV1Digest {
        /// The key as stored.
        sha256: String,
    },
    /// SQLite failed at one step.
    #[error("{step}: {source}")]
    Sql {
        /// What was being done.
        step: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
}

fn sql(step: &'static str) -> impl Fn(rusqlite::Error) -> SchemaError {
    move |source| SchemaError::Sql { step, source }
}

/// Bring the database to the current schema: create it when empty, convert
/// a v1 ledger, accept a current one, refuse anything else. Runs in one
/// `IMMEDIATE` transaction, so a second signer opening the same file waits
/// instead of converting it twice, and a failure leaves the file as it was.
pub fn ensure_current(conn: &mut Connection) -> Result<Opened, SchemaError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql("locking the database"))?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql("reading the schema version"))?;
    let opened = match version {
        CURRENT => Opened::Current,
        // v1 never set user_version (0); 1 was never written but would mean
        // the same layout.
        0 | 1 => {
            let has_table = tx
                .query_row(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'certificates'",
                    [],
                    |_| Ok(()),
                )
                .optional()
                .map_err(sql("looking for the certificates table"))?
                .is_some();
            if has_table {
                let records = migrate_v1(&tx)?;
                Opened::Migrated { records }
            } else {
                tx.execute_batch(V2_TABLE)
                    .map_err(sql("creating the certificates table"))?;
                tx.execute_batch(V2_INDEXES)
                    .map_err(sql("creating the indexes"))?;
                Opened::Created
            }
        }
        found => return Err(SchemaError::UnknownVersion { found }),
    };
    tx.execute_batch(REVOCATIONS)
        .map_err(sql("creating the revocations table"))?;
    if opened != Opened::Current {
        tx.execute_batch(&format!("PRAGMA user_version = {CURRENT}"))
            .map_err(sql("writing the schema version"))?;
    }
    tx.commit().map_err(sql("committing the schema"))?;
    Ok(opened)
}

/// Convert a v1 table into v2 inside the caller's transaction; returns the
/// number of records copied.
fn migrate_v1(tx: &rusqlite::Transaction<'_>) -> Result<u64, SchemaError> {
    let columns = {
        let mut stmt = tx
            .prepare("SELECT name, type FROM pragma_table_info('certificates') ORDER BY cid")
            .map_err(sql("reading the v1 columns"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(sql("reading the v1 columns"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql("reading the v1 columns"))?
    };
    let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    let key_is_text = columns
        .first()
        .is_some_and(|(_, ty)| ty.eq_ignore_ascii_case("TEXT"));
    if names != V1_COLUMNS || !key_is_text {
        return Err(SchemaError::NotALedger {
            columns: columns
                .iter()
                .map(|(n, t)| format!("{n} {t}"))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    // unhex() (SQLite 3.41+) gives NULL for anything that is not hex; a key
    // of the wrong length would become a blob of the wrong length. Either
    // would fail or corrupt the copy, so look first and name the row.
    let bad: Option<String> = tx
        .query_row(
            "SELECT CAST(sha256 AS TEXT) FROM certificates
             WHERE typeof(sha256) != 'text' OR length(sha256) != 64 OR unhex(sha256) IS NULL
             LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql("checking the v1 digests"))?;
    if let Some(sha256) = bad {
        return Err(SchemaError::BadV1Digest { sha256 });
    }
    // The v1 indexes go with the v1 table; the v2 ones are built after the
    // copy (one sort each instead of a random insert per row).
    tx.execute_batch("ALTER TABLE certificates RENAME TO certificates_v1")
        .map_err(sql("renaming the v1 table"))?;
    tx.execute_batch(V2_TABLE)
        .map_err(sql("creating the v2 table"))?;
    let copied = tx
        .execute(
            "INSERT INTO certificates
               (sha256, serial, spiffe_id, namespace, not_before, not_after, backend, caller, issued_at)
             SELECT unhex(sha256), serial, spiffe_id, namespace, not_before, not_after, backend, caller, issued_at
             FROM certificates_v1 ORDER BY issued_at, sha256",
            [],
        )
        .map_err(sql("copying the v1 records"))?;
    tx.execute_batch("DROP TABLE certificates_v1")
        .map_err(sql("dropping the v1 table"))?;
    tx.execute_batch(V2_INDEXES)
        .map_err(sql("creating the v2 indexes"))?;
    Ok(u64::try_from(copied).unwrap_or(u64::MAX))
}
