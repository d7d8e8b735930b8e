//! Errors from Redis and MySQL, told apart by what the caller can do.
//!
//! An engine that refuses work because it is loaded (no free connection
//! slot, a lock wait that timed out, a script still running, a replica
//! still loading) did nothing with the request: that is
//! [`StoreError::Busy`], which clients see as `OVERLOADED` and retry.
//! Anything else is [`StoreError::Backend`] (`INTERNAL`).

use std::fmt::Display;

use crate::store::StoreError;

/// MySQL/MariaDB server errors that mean "loaded, retry": too many
/// connections (1040), per-user connection limits (1203, 1226), lock wait
/// timeout (1205), deadlock (1213, the transaction was rolled back),
/// statement timeouts (MariaDB 1969, MySQL 3024).
const MYSQL_BUSY: &[u16] = &[1040, 1203, 1205, 1213, 1226, 1969, 3024];

/// An error from a storage engine (or a message about one).
pub(super) trait EngineError: Display {
    /// The engine refused the work for load; nothing was applied.
    fn busy(&self) -> bool {
        false
    }
}

impl EngineError for mysql_async::Error {
    fn busy(&self) -> bool {
        matches!(self, mysql_async::Error::Server(e) if MYSQL_BUSY.contains(&e.code))
    }
}

impl EngineError for redis::RedisError {
    fn busy(&self) -> bool {
        use redis::ErrorKind;
        matches!(
            self.kind(),
            ErrorKind::BusyLoadingError | ErrorKind::TryAgain | ErrorKind::MasterDown
        ) || match self.code() {
            Some("BUSY" | "OOM") => true,
            Some("ERR") => self
                .detail()
                .is_some_and(|d| d.starts_with("max number of clients")),
            _ => false,
        }
    }
}

impl EngineError for deadpool_redis::PoolError {
    fn busy(&self) -> bool {
        match self {
            deadpool_redis::PoolError::Timeout(_) => true,
            deadpool_redis::PoolError::Backend(e) => e.busy(),
            _ => false,
        }
    }
}

impl EngineError for &str {}
impl EngineError for String {}

fn classify(engine: &str, e: impl EngineError) -> StoreError {
    if e.busy() {
        StoreError::Busy(format!("{engine}: {e}"))
    } else {
        StoreError::Backend(format!("{engine}: {e}"))
    }
}

/// A Redis failure as a store error.
pub(super) fn redis_err(e: impl EngineError) -> StoreError {
    classify("redis", e)
}

/// A MySQL failure as a store error.
pub(super) fn mysql_err(e: impl EngineError) -> StoreError {
    classify("mysql", e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mysql(code: u16) -> mysql_async::Error {
        mysql_async::Error::Server(mysql_async::ServerError {
            code,
            message: "x".into(),
            state: "HY000".into(),
        })
    }

    fn redis_reply(line: &str) -> redis::RedisError {
        // The error as the parser builds it from a reply line.
        let reply = format!("-{line}\r\n");
        match redis::parse_redis_value(reply.as_bytes()) {
            Ok(redis::Value::ServerError(e)) => e.into(),
            Err(e) => e,
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn loaded_engines_are_busy_and_failures_are_not() {
        assert!(matches!(mysql_err(mysql(1040)), StoreError::Busy(_)));
        assert!(matches!(mysql_err(mysql(1213)), StoreError::Busy(_)));
        assert!(matches!(mysql_err(mysql(1062)), StoreError::Backend(_)));
        assert!(matches!(
            redis_err(redis_reply("ERR max number of clients reached")),
            StoreError::Busy(_)
        ));
        assert!(matches!(
            redis_err(redis_reply("BUSY Redis is busy running a script")),
            StoreError::Busy(_)
        ));
        assert!(matches!(
            redis_err(redis_reply("LOADING Redis is loading the dataset")),
            StoreError::Busy(_)
        ));
        assert!(matches!(
            redis_err(redis_reply("ERR unknown command")),
            StoreError::Backend(_)
        ));
        assert!(matches!(redis_err("bad reply"), StoreError::Backend(_)));
    }
}
