//! The MySQL schema, versioned: migrations live in `migrations/`, are
//! compiled into every binary, and run at start-up under a named lock, so
//! several server nodes and workers starting together apply each exactly
//! once.

use mysql_async::prelude::*;

/// Migrations in order: (version, SQL). Append only; never edit a released
/// one.
pub const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_dedup_key.sql")),
    (3, include_str!("../migrations/0003_sessions.sql")),
    (4, include_str!("../migrations/0004_stream_journal.sql")),
    (5, include_str!("../migrations/0005_retention.sql")),
];

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The database failed.
    #[error("migration failed: {0}")]
    Database(#[from] mysql_async::Error),
    /// Another process held the migration lock for too long.
    #[error("timed out waiting for the migration lock")]
    LockTimeout,
    /// The database was migrated by a newer version of this software.
    #[error("database schema version {found} is newer than this build knows ({known})")]
    TooNew {
        /// Version in the database.
        found: u32,
        /// Newest version this build has.
        known: u32,
    },
}

const LOCK: &str = "im_schema_migrations";

/// Applies every migration the database lacks. Safe to call from many
/// processes at once.
pub async fn migrate(pool: &mysql_async::Pool) -> Result<(), SchemaError> {
    let mut conn = pool.get_conn().await?;
    let locked: Option<i64> = conn.exec_first("SELECT GET_LOCK(?, 60)", (LOCK,)).await?;
    if locked != Some(1) {
        return Err(SchemaError::LockTimeout);
    }
    let result = apply(&mut conn).await;
    let released: Result<Option<i64>, _> = conn.exec_first("SELECT RELEASE_LOCK(?)", (LOCK,)).await;
    if let Err(e) = released {
        tracing::warn!(error = %e, "releasing the migration lock failed");
    }
    result
}

async fn apply(conn: &mut mysql_async::Conn) -> Result<(), SchemaError> {
    conn.query_drop(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
           version INT UNSIGNED NOT NULL PRIMARY KEY,
           applied_ms BIGINT NOT NULL
         ) ENGINE=InnoDB",
    )
    .await?;
    // MAX over no rows is NULL.
    let current: Option<Option<u32>> = conn
        .query_first("SELECT MAX(version) FROM schema_migrations")
        .await?;
    let current = current.flatten().unwrap_or(0);
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if current > known {
        return Err(SchemaError::TooNew {
            found: current,
            known,
        });
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        for statement in statements(sql) {
            conn.query_drop(statement).await?;
        }
        conn.exec_drop(
            "INSERT INTO schema_migrations (version, applied_ms) VALUES (?, ?)",
            (version, im_proto::now_ms()),
        )
        .await?;
        tracing::info!(version, "applied schema migration");
    }
    Ok(())
}

/// Splits a migration into statements (on `;` at line ends; comments
/// dropped).
fn statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let line = line.trim_end();
        if line.trim_start().starts_with("--") || line.is_empty() {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if line.ends_with(';') {
            let statement = current.trim().trim_end_matches(';').to_string();
            out.push(statement);
            current.clear();
        }
    }
    if !current.trim().is_empty() {
        out.push(current.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_split_into_statements() {
        let all: Vec<String> = MIGRATIONS.iter().flat_map(|m| statements(m.1)).collect();
        assert_eq!(all.len(), 9);
        assert!(
            all.iter()
                .all(|s| s.starts_with("CREATE TABLE") || s.starts_with("ALTER TABLE"))
        );
        assert!(all.iter().all(|s| !s.contains("--")));
        let versions: Vec<u32> = MIGRATIONS.iter().map(|m| m.0).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]));
    }
}
