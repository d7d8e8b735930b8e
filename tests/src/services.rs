//! Throwaway Redis and MariaDB instances for the pipeline tests: each in a
//! temp directory on a free port, never a shared database.
//!
//! [`shared`] gives every test of a binary the same pair (from
//! `REDIS_URL`/`MYSQL_URL` when set, else started once, with a watchdog
//! that stops them when the test process exits); [`second_mysql`] a second
//! MariaDB the same way (`MYSQL_URL_2`), for messages sharded over two
//! servers. Tests isolate themselves with [`unique_prefix`] and
//! [`fresh_database`]. Crash tests start their own [`RedisServer`] and
//! [`MariaDb`] so they can kill and restart them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::free_port;

/// A redis-server child process.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    aof: bool,
}

impl RedisServer {
    /// Starts redis-server in a temp directory; `aof` turns on the
    /// append-only file with `appendfsync always`.
    pub fn start(aof: bool) -> RedisServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir,
            aof,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = redis_command(self.dir.path(), self.port, self.aof)
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        wait_for_redis(self.port);
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the process at once (SIGKILL), like a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (reloading the AOF).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Makes every write (and every script not flagged `no-writes`) wait
    /// for `millis` from now, while reads go on (`CLIENT PAUSE ... WRITE`).
    pub async fn pause_writes(&self, millis: u64) {
        let client = redis::Client::open(self.url()).expect("redis url");
        let mut admin = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(millis)
            .arg("WRITE")
            .query_async(&mut admin)
            .await
            .expect("CLIENT PAUSE");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_command(dir: &Path, port: u16, aof: bool) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
    ])
    .arg("--dir")
    .arg(dir)
    .args(["--appendonly", if aof { "yes" } else { "no" }])
    .args([
        "--appendfsync",
        "always",
        "--daemonize",
        "no",
        "--logfile",
        "",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

/// A mariadbd child process with its own data directory.
pub struct MariaDb {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
}

impl MariaDb {
    /// Initialises a data directory and starts mariadbd on a free port;
    /// root has an empty password.
    pub fn start() -> MariaDb {
        let dir = tempfile::tempdir().expect("temp dir");
        install_mariadb(dir.path());
        let mut db = MariaDb {
            child: None,
            port: free_port(),
            dir,
        };
        db.spawn();
        db
    }

    fn spawn(&mut self) {
        let child = mariadb_command(self.dir.path(), self.port)
            .spawn()
            .expect("start mariadbd (is it installed?)");
        self.child = Some(child);
        wait_for_mysql(self.port);
    }

    /// `mysql://root@127.0.0.1:PORT` (no database).
    pub fn server_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL: as abrupt as a crash or a lost host).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and data directory.
    pub fn start_again(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The temp directory of one MariaDB instance. Each needs its own: the
/// bootstrap names its temporary tables after the thread, not the process,
/// so installs running side by side in one /tmp clobber each other's.
fn mariadb_tmp(dir: &Path) -> PathBuf {
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).expect("MariaDB temp dir");
    tmp
}

fn install_mariadb(dir: &Path) {
    let status = Command::new("mariadb-install-db")
        .arg("--no-defaults")
        .arg(format!("--datadir={}", dir.join("data").display()))
        .arg(format!("--tmpdir={}", mariadb_tmp(dir).display()))
        .args([
            "--user=root",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ])
        .output()
        .expect("run mariadb-install-db (is MariaDB installed?)");
    assert!(
        status.status.success(),
        "mariadb-install-db failed: {}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
}

fn mariadb_command(dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new("mariadbd");
    cmd.arg("--no-defaults")
        .arg(format!("--datadir={}", dir.join("data").display()))
        .arg(format!("--socket={}", dir.join("mysql.sock").display()))
        .arg(format!("--pid-file={}", dir.join("mysql.pid").display()))
        .arg(format!("--tmpdir={}", mariadb_tmp(dir).display()))
        .arg(format!("--port={port}"))
        .args([
            "--bind-address=127.0.0.1",
            "--user=root",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=256M",
            "--innodb-log-file-size=128M",
            "--max-connections=500",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until redis-server answers PING with PONG: after a restart it
/// accepts connections while still loading its append-only file, and
/// answers everything with LOADING until it is done.
fn wait_for_redis(port: u16) {
    use std::io::{Read, Write};
    wait_for_port(port, "redis-server");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pong = std::net::TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.write_all(b"PING\r\n")?;
            let mut reply = [0u8; 5];
            s.read_exact(&mut reply)?;
            Ok(&reply == b"+PONG")
        });
        if pong.unwrap_or(false) {
            return;
        }
        assert!(Instant::now() < deadline, "redis-server did not load");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_mysql(port: u16) {
    wait_for_port(port, "mariadbd");
    // The port opens a moment before the server takes queries.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new("mariadb")
            .args([
                "-h127.0.0.1",
                &format!("-P{port}"),
                "-uroot",
                "-e",
                "SELECT 1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "mariadbd on port {port} takes no queries"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Redis and MySQL URLs shared by the tests of one process.
#[derive(Debug, Clone)]
pub struct Shared {
    /// `redis://...`
    pub redis_url: String,
    /// `mysql://user@host:port` without a database.
    pub mysql_url: String,
}

/// The shared services: `REDIS_URL` / `MYSQL_URL` if set, else a Redis
/// (AOF on) and a MariaDB started on first use and stopped by a watchdog
/// when this process exits.
pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| {
            let dir = keep_dir("redis");
            let port = free_port();
            let child = redis_command(&dir, port, true)
                .spawn()
                .expect("start redis-server");
            watch(child, &dir);
            wait_for_redis(port);
            format!("redis://127.0.0.1:{port}")
        });
        let mysql_url = std::env::var("MYSQL_URL").unwrap_or_else(|_| kept_mariadb());
        Shared {
            redis_url,
            mysql_url: mysql_url.trim_end_matches('/').to_string(),
        }
    })
}

/// A second MariaDB server for the tests of one process (`mysql://...`
/// without a database): `MYSQL_URL_2` if set, else one started on first
/// use and stopped by a watchdog when this process exits.
pub fn second_mysql() -> &'static str {
    static SECOND: OnceLock<String> = OnceLock::new();
    SECOND.get_or_init(|| {
        std::env::var("MYSQL_URL_2")
            .unwrap_or_else(|_| kept_mariadb())
            .trim_end_matches('/')
            .to_string()
    })
}

/// Starts a MariaDB that lives as long as this process; its server URL.
fn kept_mariadb() -> String {
    let dir = keep_dir("mariadb");
    install_mariadb(&dir);
    let port = free_port();
    let child = mariadb_command(&dir, port).spawn().expect("start mariadbd");
    watch(child, &dir);
    wait_for_mysql(port);
    format!("mysql://root@127.0.0.1:{port}")
}

/// A temp directory that outlives its handle (the watchdog removes it).
fn keep_dir(what: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(&format!("im-test-{what}-"))
        .tempdir()
        .expect("temp dir")
        .keep()
}

/// Children that live as long as the test process (reaped by the watchdog).
static KEEP: std::sync::Mutex<Vec<Child>> = std::sync::Mutex::new(Vec::new());

/// Kills `child` and removes `dir` once this process has exited.
pub(crate) fn keep_until_exit(child: Child, dir: &Path) {
    watch(child, dir);
}

/// Kills `child` and removes `dir` once this process has exited.
fn watch(child: Child, dir: &Path) {
    let pid = child.id();
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill -9 {pid} 2>/dev/null; sleep 0.5; rm -rf '{dir}'",
        me = std::process::id(),
        dir = dir.display()
    );
    let watchdog = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start watchdog");
    let mut keep = KEEP.lock().unwrap_or_else(|p| p.into_inner());
    keep.push(child);
    keep.push(watchdog);
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("t{:016x}", rand_u64())
}

/// Creates an empty database on `server_url` and returns its URL.
pub fn fresh_database(server_url: &str) -> String {
    let name = format!("im_test_{:016x}", rand_u64());
    let port = server_url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("MySQL URL with a port");
    let host = server_url
        .trim_start_matches("mysql://")
        .rsplit_once('@')
        .map_or("127.0.0.1", |(_, h)| {
            h.split(':').next().unwrap_or("127.0.0.1")
        })
        .to_string();
    let status = Command::new("mariadb")
        .args([&format!("-h{host}"), &format!("-P{port}"), "-uroot"])
        .args(["-e", &format!("CREATE DATABASE {name}")])
        .status()
        .expect("run mariadb client");
    assert!(status.success(), "cannot create database {name}");
    format!("{server_url}/{name}")
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
