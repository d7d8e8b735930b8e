//! Load generator smoke runs against a real node (either store): a few
//! hundred simulated users for a few seconds per scenario, and the run
//! must verify every delivery.

use clap::Parser;
use im_loadgen::{Args, Report};
use im_tests::TestServer;

async fn run(server: &TestServer, flags: &[&str]) -> Report {
    let addr = server.addr.to_string();
    let mut argv = vec![
        "im-loadgen",
        "--server",
        &addr,
        "--quiet",
        "--warmup",
        "1",
        "--settle",
        "1",
    ];
    argv.extend_from_slice(flags);
    if !flags.contains(&"--duration") {
        argv.extend(["--duration", "2"]);
    }
    let args = Args::try_parse_from(argv).expect("valid flags");
    let (report, _) = im_loadgen::run(args).await.expect("load run");
    assert!(!report.failed(), "verification failed: {report:#?}");
    assert_eq!(report.messages_lost, 0);
    assert_eq!(report.connections_established, report.connections_target);
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_chat_under_load_delivers_everything_once_in_order() {
    let server = TestServer::start().await;
    let r = run(
        &server,
        &[
            "--scenario",
            "direct",
            "--connections",
            "200",
            "--rate",
            "2000",
        ],
    )
    .await;
    assert!(r.messages_acked > 2000, "{r:?}");
    assert_eq!(r.messages_delivered, r.messages_acked);
    assert!(r.latency_us.deliver.count > 0 && r.latency_us.deliver.p50 > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_fan_out_under_load_delivers_everything() {
    let server = TestServer::start().await;
    let r = run(
        &server,
        &[
            "--scenario",
            "group",
            "--group-size",
            "20",
            "--connections",
            "100",
            "--rate",
            "500",
        ],
    )
    .await;
    // Each message reaches the 19 other members; the creation notices reach
    // everyone but their creator.
    assert!(r.messages_delivered >= r.messages_acked * 19, "{r:?}");
    assert!(r.deliveries_per_s > r.throughput_msgs_per_s * 10.0);
}

/// Members whose output queues overflow have pushes skipped, get a
/// SyncHint, sync, and still see every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_pushes_are_recovered_after_the_hint() {
    let server = TestServer::start_with(|c| {
        c.max_frame_bytes = 16 * 1024;
        c.max_outbound_bytes = 16 * 1024;
        c.send_buffer_bytes = 4096;
    })
    .await;
    let r = run(
        &server,
        &[
            "--scenario",
            "group",
            "--group-size",
            "20",
            "--connections",
            "100",
            "--rate",
            "2000",
            "--size",
            "2000",
        ],
    )
    .await;
    let net = server.node().net_stats();
    assert!(net.pushes_shed > 0 && r.sync_hints > 0, "{r:?} {net:?}");
    assert_eq!(net.slow_consumers, 0);
    assert!(r.messages_delivered >= r.messages_acked * 19, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_recovers_everything_by_sync() {
    let server = TestServer::start().await;
    let r = run(
        &server,
        &[
            "--scenario",
            "storm",
            "--connections",
            "200",
            "--rate",
            "1000",
            "--duration",
            "3",
        ],
    )
    .await;
    assert!(r.reconnects_per_s > 0.0, "{r:?}");
    assert!(r.messages_delivered > 0);
    // Sends the drop left unacknowledged were resent (flagged), each
    // acknowledged once, as stored before or stored now.
    assert!(r.resends_found_stored <= r.messages_resent, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_just_stay() {
    let server = TestServer::start().await;
    let r = run(
        &server,
        &["--scenario", "idle", "--connections", "300", "--ramp", "0"],
    )
    .await;
    assert_eq!(r.messages_sent, 0);
    assert_eq!(r.latency_us.connect.count, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_splits_a_run_over_worker_processes() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let plot = dir.path().join("report.svg");
    let output = tokio::process::Command::new(im_tests::binary("im-loadgen"))
        .args(["--server", &server.addr.to_string(), "--scenario", "direct"])
        .args(["--connections", "200", "--rate", "2000", "--workers", "2"])
        .args(["--user-prefix", "split"])
        .args([
            "--warmup",
            "1",
            "--duration",
            "2",
            "--settle",
            "1",
            "--quiet",
        ])
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&plot)
        .output()
        .await
        .expect("run im-loadgen");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(
            "verification: 0 lost, 0 unanswered, 0 duplicated, 0 pushes out of order, 0 misrouted"
        ),
        "{stdout}"
    );
    let report: Report = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report.workers, 2);
    assert_eq!(report.connections_established, 200);
    assert!(report.messages_delivered > 0);
    for field in [
        "\"scenario\"",
        "\"throughput_msgs_per_s\"",
        "\"deliveries_per_s\"",
        "\"p999\"",
    ] {
        assert!(
            std::fs::read_to_string(&json).unwrap().contains(field),
            "{field}"
        );
    }
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
}

/// Connections that logged in early heartbeat while the rest of the ramp
/// logs in: a ramp longer than the server's heartbeat timeout closes none
/// of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramp_longer_than_the_heartbeat_timeout_loses_no_connection() {
    let server = TestServer::start_with(|c| {
        c.heartbeat_interval_secs = 1;
        c.heartbeat_timeout_secs = 2;
    })
    .await;
    // 40 logins at 10 per second: the first waits 4 s for the last.
    let r = run(
        &server,
        &[
            "--scenario",
            "direct",
            "--connections",
            "40",
            "--ramp",
            "10",
            "--rate",
            "200",
        ],
    )
    .await;
    assert_eq!(r.errors, 0, "{r:#?}");
    assert_eq!(r.messages_resent, 0, "{r:#?}");
    assert_eq!(r.messages_delivered, r.messages_acked, "{r:#?}");
}
