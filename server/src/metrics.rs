//! What a node reports on its admin listener (`--admin-listen`): the
//! Prometheus metrics of the connection layer, the chat service and their
//! queues, read from their counters at each scrape, and the node's health.
//!
//! The listener itself is [`im_storage::admin`], shared with the storage
//! worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use im_storage::admin::{AdminSource, Exposition};

use crate::chat::{ChatService, ChatStatsSnapshot};
use crate::net::{NetStatsSnapshot, Outbound};
use crate::server::Closeable;

/// The metrics and health of one node.
pub(crate) struct NodeMetrics<S: Closeable> {
    pub outbound: Outbound,
    pub service: ChatService<S>,
    pub store: Arc<S>,
    /// Cleared when shutdown begins.
    pub accepting: Arc<AtomicBool>,
    pub cluster: Option<crate::cluster::Cluster>,
}

impl<S: Closeable> AdminSource for NodeMetrics<S> {
    fn collect(&self, out: &mut Exposition) {
        export(out, &self.outbound.stats(), &self.service.stats());
        if let Some(cluster) = &self.cluster {
            export_cluster(out, &cluster.stats());
        }
    }

    async fn health(&self) -> Result<(), String> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err("shutting down".into());
        }
        self.store.health().await
    }
}

/// Adds a node's metrics to a scrape: `net` from the connection layer
/// (with the queues to its event loops), `chat` from the chat service.
pub fn export(out: &mut Exposition, net: &NetStatsSnapshot, chat: &ChatStatsSnapshot) {
    // ---- connections ----
    out.gauge(
        "im_connections",
        "Open client connections.",
        net.connections,
    );
    out.counter(
        "im_connections_accepted_total",
        "Client connections accepted.",
        net.accepted,
    );
    out.counter(
        "im_frames_received_total",
        "Frames received from clients.",
        net.frames_in,
    );
    out.counter(
        "im_frames_sent_total",
        "Frames sent to clients.",
        net.frames_out,
    );
    out.counter(
        "im_bytes_received_total",
        "Bytes received from clients.",
        net.bytes_in,
    );
    out.counter(
        "im_bytes_sent_total",
        "Bytes written to clients.",
        net.bytes_out,
    );
    out.counter(
        "im_slow_consumer_disconnects_total",
        "Connections closed as SLOW_CONSUMER: queued output went unread for --slow-consumer-secs.",
        net.slow_consumers,
    );
    out.counter(
        "im_pushes_shed_total",
        "Pushes not queued because the connection's output passed --max-outbound-bytes (it was told to sync instead).",
        net.pushes_shed,
    );
    out.counter(
        "im_sync_hints_total",
        "SyncHint pushes sent to connections that had pushes shed.",
        net.sync_hints,
    );
    out.gauge(
        "im_connection_output_bytes",
        "Bytes waiting in connections' output queues for their sockets.",
        net.output_bytes,
    );
    out.counter(
        "im_protocol_errors_total",
        "Connections closed for a bad or oversized frame or a protocol violation.",
        net.protocol_errors,
    );
    out.counter(
        "im_proxy_header_errors_total",
        "Connections from a --proxy-protocol-from balancer closed for a malformed or oversized PROXY header.",
        net.proxy_header_errors,
    );
    out.counter(
        "im_timeouts_total",
        "Connections closed for a missing authentication or heartbeat.",
        net.timeouts,
    );
    out.counter(
        "im_tls_handshakes_total",
        "Full TLS handshakes completed on the TLS listener.",
        net.tls_handshakes,
    );
    out.counter(
        "im_tls_resumptions_total",
        "TLS handshakes that resumed a session from a ticket.",
        net.tls_resumptions,
    );
    out.counter(
        "im_tls_errors_total",
        "TLS connections closed for a failed handshake or a bad record.",
        net.tls_errors,
    );

    let chat_limits = crate::chat::limits::CHAT_LIMITS
        .iter()
        .copied()
        .zip(chat.rate_limited);
    out.counter_by(
        "im_rate_limited_total",
        "Refusals answered RATE_LIMITED, by limit (requests_per_conn, new_conns_per_addr and conns_per_addr from the connection layer; the others from the chat layer).",
        "limit",
        [
            (crate::net::REQUESTS_PER_CONN, net.rate_limited_requests),
            (crate::net::NEW_CONNS_PER_ADDR, net.rate_limited_new_conns),
            (crate::net::CONNS_PER_ADDR, net.rate_limited_open_conns),
        ]
        .into_iter()
        .chain(chat_limits),
    );

    // ---- chat ----
    out.counter(
        "im_messages_appended_total",
        "Messages the store appended (client sends and server notices).",
        chat.appended,
    );
    out.counter(
        "im_messages_acked_total",
        "SendAcks sent to clients, duplicates included.",
        chat.acked,
    );
    out.counter(
        "im_messages_duplicate_total",
        "SendAcks for a resend the store had already appended.",
        chat.duplicates,
    );
    out.counter(
        "im_messages_pushed_total",
        "Message pushes queued to recipients' connections.",
        chat.pushed,
    );
    out.counter(
        "im_receipts_total",
        "Delivered and read receipts that moved a cursor.",
        chat.receipts,
    );
    out.counter(
        "im_auth_failures_total",
        "Logins and resumes refused: wrong credentials, a bad or expired token, or rate limited.",
        chat.auth_failures,
    );
    out.counter(
        "im_sessions_ended_total",
        "Sessions this node ended: logout, password change, end-session, device limit.",
        chat.sessions_ended,
    );
    out.counter(
        "im_sessions_ended_by_device_limit_total",
        "Sessions ended because a login passed the devices-per-user limit.",
        chat.sessions_ended_by_limit,
    );
    out.gauge(
        "im_ended_sessions_cached",
        "Ended sessions held in memory for resume checks.",
        chat.ended_sessions_cached,
    );
    out.gauge(
        "im_online_users",
        "Users with at least one live connection on this node.",
        chat.online_users,
    );
    out.gauge(
        "im_presence_subscriptions",
        "Connections on this node with a presence subscription.",
        chat.presence_subscriptions,
    );

    // ---- queues ----
    out.gauge(
        "im_outbound_queue_depth",
        "Replies and pushes queued to the event loops and not yet taken up.",
        net.queued_commands,
    );
    out.gauge(
        "im_outbound_queue_bytes",
        "Bytes of those (fan-out and receipts wait above --outbound-queue-bytes).",
        net.queued_bytes,
    );
    out.gauge(
        "im_send_queue_depth",
        "Sends waiting in the send lanes for an append batch (new sends get OVERLOADED when a lane holds --send-queue).",
        chat.send_queued,
    );
    out.gauge(
        "im_send_pending_bytes",
        "Bytes of sends admitted to the send lanes and not answered yet (--send-queue-bytes per lane, --max-user-pending-bytes per user).",
        chat.send_pending_bytes,
    );
    out.gauge(
        "im_requests_in_flight",
        "Requests received and not answered yet.",
        chat.in_flight,
    );
}

/// Adds a cluster node's metrics to a scrape.
pub fn export_cluster(out: &mut Exposition, c: &crate::cluster::ClusterStatsSnapshot) {
    out.gauge(
        "im_cluster_incarnation",
        "This node's current incarnation (a new one after each start or rejoin).",
        c.incarnation,
    );
    out.gauge(
        "im_cluster_live_nodes",
        "Live node incarnations in this node's view, itself included.",
        c.live_nodes,
    );
    out.counter(
        "im_cluster_route_writes_total",
        "Route changes written to Redis (a user's first device here, or last one gone).",
        c.route_writes,
    );
    out.counter(
        "im_cluster_pushes_forwarded_total",
        "Pushes forwarded to other nodes, one per push and destination node.",
        c.forwarded,
    );
    out.counter(
        "im_cluster_envelopes_sent_total",
        "Envelopes (batches of pushes) published to other nodes.",
        c.envelopes_out,
    );
    out.counter(
        "im_cluster_envelopes_received_total",
        "Envelopes received from other nodes.",
        c.envelopes_in,
    );
    out.counter(
        "im_cluster_pushes_received_total",
        "Pushes received from other nodes.",
        c.pushes_in,
    );
    out.counter(
        "im_cluster_envelopes_lost_total",
        "Envelopes that could not be published, reached no subscriber, or were dropped on arrival.",
        c.lost,
    );
    out.counter(
        "im_cluster_sync_hints_total",
        "Times every local session was told to sync because cross-node pushes may have been lost.",
        c.hints,
    );
    out.counter(
        "im_cluster_rejoins_total",
        "Times this node took a new incarnation while running (lease lapsed or a route write failed).",
        c.reregistered,
    );
    out.counter(
        "im_cluster_sweeps_total",
        "Dead incarnations whose routes this node removed.",
        c.swept,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_typed_named_and_documented() {
        let net = NetStatsSnapshot {
            connections: 2,
            accepted: 3,
            frames_in: 10,
            slow_consumers: 1,
            queued_commands: 9,
            rate_limited_new_conns: 7,
            ..NetStatsSnapshot::default()
        };
        let chat = ChatStatsSnapshot {
            appended: 5,
            acked: 6,
            duplicates: 1,
            send_queued: 4,
            rate_limited: [8, 0, 0, 0, 0],
            ..ChatStatsSnapshot::default()
        };
        let mut out = Exposition::new();
        export(&mut out, &net, &chat);
        let text = out.encode().unwrap();
        let counters = [
            "im_connections_accepted_total",
            "im_frames_received_total",
            "im_frames_sent_total",
            "im_bytes_received_total",
            "im_bytes_sent_total",
            "im_slow_consumer_disconnects_total",
            "im_pushes_shed_total",
            "im_sync_hints_total",
            "im_protocol_errors_total",
            "im_proxy_header_errors_total",
            "im_timeouts_total",
            "im_tls_handshakes_total",
            "im_tls_resumptions_total",
            "im_tls_errors_total",
            "im_messages_appended_total",
            "im_messages_acked_total",
            "im_messages_duplicate_total",
            "im_messages_pushed_total",
            "im_receipts_total",
            "im_auth_failures_total",
            "im_rate_limited_total",
            "im_sessions_ended_total",
            "im_sessions_ended_by_device_limit_total",
        ];
        let gauges = [
            "im_connections",
            "im_online_users",
            "im_presence_subscriptions",
            "im_ended_sessions_cached",
            "im_connection_output_bytes",
            "im_outbound_queue_depth",
            "im_outbound_queue_bytes",
            "im_send_queue_depth",
            "im_send_pending_bytes",
            "im_requests_in_flight",
        ];
        for (names, kind) in [(&counters[..], "counter"), (&gauges[..], "gauge")] {
            for name in names {
                assert!(text.contains(&format!("# HELP {name} ")), "{name}: {text}");
                assert!(
                    text.contains(&format!("# TYPE {name} {kind}\n")),
                    "{name}: {text}"
                );
            }
        }
        // One TYPE line per metric, nothing unlisted.
        let typed = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(typed, counters.len() + gauges.len(), "{text}");
        for line in [
            "im_connections 2\n",
            "im_connections_accepted_total 3\n",
            "im_frames_received_total 10\n",
            "im_slow_consumer_disconnects_total 1\n",
            "im_messages_appended_total 5\n",
            "im_messages_acked_total 6\n",
            "im_messages_duplicate_total 1\n",
            "im_send_queue_depth 4\n",
            "im_outbound_queue_depth 9\n",
            "im_rate_limited_total{limit=\"new_conns_per_addr\"} 7\n",
            "im_rate_limited_total{limit=\"messages_per_user\"} 8\n",
            "im_rate_limited_total{limit=\"groups_per_user\"} 0\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }
}
