//! Lua script calls that reach the node holding their keys, on one Redis
//! and on a Redis Cluster whose slots are moving.
//!
//! A [`ScriptCall`] is one script invocation, sent alone (with a `WAIT`
//! after it when replicas must confirm), never pipelined with another
//! script: the cluster client resends a whole pipeline when any command in
//! it is redirected, which would run again a script of the same pipeline
//! that had already run. Sent alone, every retry below is of a call that
//! did not run:
//!
//! - `-NOSCRIPT` (a restarted node, or the master a slot is moving to,
//!   which never saw the script): sent again as `EVAL` with the whole
//!   code, which runs it and caches it on whichever node answers;
//! - `-ASK` (the slot is migrating and every key of the call has moved):
//!   sent again to the node named, as one pipeline `ASKING`, the call,
//!   `WAIT`, so the `ASKING` flag applies to the call and nothing else;
//! - `-TRYAGAIN` (the call's keys are split between the two nodes, or one
//!   does not exist yet, while the slot migrates), `-MOVED`, `-CLUSTERDOWN`
//!   and `-MASTERDOWN`: sent again after a pause, for up to
//!   [`MIGRATION_RETRY`];
//! - a connection found broken before the call could be written: once.
//!
//! A call that failed any other way (a timeout, a reset) may have run, and
//! is not sent again here. The cluster client itself resends a call after
//! a timeout; a script that must not run twice makes its runs idempotent
//! (the append script answers a call it already ran from its memo).

use std::time::{Duration, Instant};

use redis::{Cmd, ErrorKind, RedisError, RedisResult, ToRedisArgs, Value};

use crate::redis_target::RedisConn;

/// How long a call is retried while its slot migrates (`-TRYAGAIN` lasts
/// until the slot's keys have all moved, `-ASK` until the target owns it).
pub const MIGRATION_RETRY: Duration = Duration::from_secs(20);

/// A Lua script, called by its SHA1 and sent whole where a node lacks it.
#[derive(Debug, Clone)]
pub struct LuaScript {
    code: &'static str,
    hash: String,
}

impl LuaScript {
    /// The script with this code.
    pub fn new(code: &'static str) -> LuaScript {
        LuaScript {
            code,
            hash: redis::Script::new(code).get_hash().to_string(),
        }
    }

    /// A call of the script with no keys or arguments yet.
    pub fn call(&self) -> ScriptCall<'_> {
        ScriptCall {
            script: self,
            keys: Words::default(),
            args: Words::default(),
        }
    }
}

/// One invocation of a [`LuaScript`]: its keys (`KEYS`) and arguments
/// (`ARGV`).
#[derive(Debug, Clone)]
pub struct ScriptCall<'a> {
    script: &'a LuaScript,
    keys: Words,
    args: Words,
}

/// Command words packed end to end in one buffer, so that a call of a
/// hundred messages costs a few growing buffers rather than an allocation
/// per argument.
#[derive(Debug, Clone, Default)]
struct Words {
    bytes: Vec<u8>,
    /// Where each word ends in `bytes`.
    ends: Vec<usize>,
}

impl Words {
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.bytes[start..end])
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

impl redis::RedisWrite for Words {
    fn write_arg(&mut self, arg: &[u8]) {
        self.bytes.extend_from_slice(arg);
        self.ends.push(self.bytes.len());
    }

    fn write_arg_fmt(&mut self, arg: impl std::fmt::Display) {
        use std::io::Write as _;
        let _ = write!(self.bytes, "{arg}");
        self.ends.push(self.bytes.len());
    }

    fn writer_for_next_arg(&mut self) -> impl std::io::Write + '_ {
        self.ends.push(self.bytes.len());
        WordWriter(self)
    }
}

/// Writes into the last word of a [`Words`].
struct WordWriter<'a>(&'a mut Words);

impl std::io::Write for WordWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.bytes.extend_from_slice(buf);
        if let Some(end) = self.0.ends.last_mut() {
            *end = self.0.bytes.len();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ScriptCall<'_> {
    /// Adds a key (`KEYS[i]`).
    pub fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    /// Adds an argument (`ARGV[i]`).
    pub fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// Its keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.keys.iter()
    }

    /// The call as one command: `EVALSHA`, or with `whole` an `EVAL` of
    /// the code. For pipelines of calls that may run twice (read-only or
    /// idempotent ones); [`ScriptCall::run`] sends a call alone.
    pub fn command(&self, whole: bool) -> Cmd {
        let mut cmd = if whole {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(self.script.code);
            cmd
        } else {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(self.script.hash.as_str());
            cmd
        };
        cmd.arg(self.keys.len());
        for word in self.keys.iter().chain(self.args.iter()) {
            cmd.arg(word);
        }
        cmd
    }

    /// Runs the call where its keys are and returns its reply.
    pub async fn run(&self, conn: &mut RedisConn) -> RedisResult<Value> {
        Ok(self.run_and_wait(conn, None).await?.0)
    }

    /// Runs the call, then with `wait` = (replicas, ms) a `WAIT` on the
    /// same node, and returns both replies (the second only with `wait`).
    pub async fn run_and_wait(
        &self,
        conn: &mut RedisConn,
        wait: Option<(u32, u64)>,
    ) -> RedisResult<(Value, Option<Value>)> {
        let deadline = Instant::now() + MIGRATION_RETRY;
        let mut whole = false;
        let mut reconnected = false;
        // The node an -ASK named: later tries go there, with ASKING.
        let mut asked: Option<String> = None;
        let mut pause = Duration::from_millis(10);
        loop {
            let mut pipe = redis::pipe();
            if asked.is_some() {
                pipe.cmd("ASKING");
            }
            pipe.add_command(self.command(whole));
            if let Some((replicas, ms)) = wait {
                pipe.cmd("WAIT").arg(replicas).arg(ms);
            }
            let result = match &asked {
                Some(node) => conn.query_on_node(node, &pipe).await,
                None => pipe.query_async::<Vec<Value>>(conn).await,
            };
            let error = match result {
                Ok(mut values) => {
                    if asked.is_some() && !values.is_empty() {
                        values.remove(0);
                    }
                    let mut values = values.into_iter();
                    let reply = values.next().ok_or_else(short_reply)?;
                    let waited = match wait {
                        Some(_) => Some(values.next().ok_or_else(short_reply)?),
                        None => None,
                    };
                    return Ok((reply, waited));
                }
                Err(e) => e,
            };
            match error.kind() {
                ErrorKind::NoScriptError if !whole => whole = true,
                _ if unsent(&error) && !reconnected => reconnected = true,
                kind if migrating(kind) && Instant::now() < deadline => {
                    tracing::debug!(error = %error, "script call refused while its slot moves; retrying");
                    match kind {
                        ErrorKind::Ask => {
                            asked = error.redirect_node().map(|(node, _)| node.to_string());
                        }
                        ErrorKind::Moved => asked = None,
                        _ => {}
                    }
                    if kind != ErrorKind::Ask {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(200));
                    }
                }
                // The node an -ASK named is not connected (yet): back to
                // routing by slot.
                ErrorKind::ClientError if asked.is_some() && Instant::now() < deadline => {
                    asked = None;
                }
                _ => return Err(error),
            }
        }
    }
}

/// Sends `calls` in one pipeline and returns their replies in order; a
/// node that lacks a script is sent the pipeline again with the scripts
/// whole. Only for calls that may run twice with the same outcome
/// (read-only or idempotent ones): the cluster client resends a whole
/// pipeline when one of its commands is redirected.
pub async fn query_idempotent<C, T>(conn: &mut C, calls: &[ScriptCall<'_>]) -> RedisResult<Vec<T>>
where
    C: redis::aio::ConnectionLike + Send,
    T: redis::FromRedisValue,
{
    if calls.is_empty() {
        return Ok(Vec::new());
    }
    let pipe = |whole: bool| {
        let mut pipe = redis::pipe();
        for call in calls {
            pipe.add_command(call.command(whole));
        }
        pipe
    };
    match pipe(false).query_async(conn).await {
        Err(e) if e.kind() == ErrorKind::NoScriptError => pipe(true).query_async(conn).await,
        other => other,
    }
}

fn short_reply() -> RedisError {
    RedisError::from((
        ErrorKind::ResponseError,
        "a script call answered fewer replies",
    ))
}

/// Errors with which a cluster refuses a call before running it, while a
/// slot moves or its master changes.
fn migrating(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::TryAgain
            | ErrorKind::Ask
            | ErrorKind::Moved
            | ErrorKind::ClusterDown
            | ErrorKind::MasterDown
    )
}

/// Whether a failed call cannot have reached Redis: the connection was
/// refused, the manager's reconnection failed, or writing failed (a
/// broken pipe).
pub fn unsent(e: &RedisError) -> bool {
    use std::error::Error as _;
    let io_kind = e
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(std::io::Error::kind);
    e.is_connection_refusal()
        || io_kind == Some(std::io::ErrorKind::BrokenPipe)
        || (e.kind() == ErrorKind::IoError && e.to_string().starts_with("Reconnecting failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(cmd: Cmd) -> Vec<Vec<u8>> {
        cmd.args_iter()
            .filter_map(|a| match a {
                redis::Arg::Simple(b) => Some(b.to_vec()),
                redis::Arg::Cursor => None,
            })
            .collect()
    }

    #[test]
    fn calls_are_sent_by_hash_or_whole() {
        let script = LuaScript::new("return KEYS[1]");
        let mut call = script.call();
        call.key("k").arg(7).arg("x").arg(&b""[..]).arg(-2.5);
        let by_hash = words(call.command(false));
        assert_eq!(by_hash[0], b"EVALSHA");
        assert_eq!(
            by_hash[1],
            redis::Script::new("return KEYS[1]").get_hash().as_bytes()
        );
        assert_eq!(&by_hash[2..], [&b"1"[..], b"k", b"7", b"x", b"", b"-2.5"]);
        let whole = words(call.command(true));
        assert_eq!(whole[0], b"EVAL");
        assert_eq!(whole[1], b"return KEYS[1]");
        assert_eq!(call.keys().collect::<Vec<_>>(), [b"k"]);
    }
}
