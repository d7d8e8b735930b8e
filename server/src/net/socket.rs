//! Listening sockets built with socket2, so every option operators tune
//! (backlog, SO_REUSEPORT, TCP_NODELAY, keepalive, buffer sizes) is set
//! explicitly and before `listen`.
//!
//! Options set on the listener are inherited by the sockets it accepts on
//! Linux, so accepting costs no extra `setsockopt` per connection.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

use super::NetConfig;

/// Creates a non-blocking listener on `addr` with the configured options.
pub fn listener(config: &NetConfig, addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if config.reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_tcp_nodelay(config.nodelay)?;
    if config.keepalive_secs > 0 {
        let idle = Duration::from_secs(u64::from(config.keepalive_secs));
        let keepalive = TcpKeepalive::new()
            .with_time(idle)
            .with_interval(idle / 3)
            .with_retries(3);
        socket.set_tcp_keepalive(&keepalive)?;
    }
    if config.send_buffer_bytes > 0 {
        socket.set_send_buffer_size(config.send_buffer_bytes)?;
    }
    if config.recv_buffer_bytes > 0 {
        socket.set_recv_buffer_size(config.recv_buffer_bytes)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(config.backlog.min(i32::MAX as u32) as i32)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    #[test]
    fn accepted_sockets_inherit_listener_options() {
        let config = NetConfig {
            nodelay: true,
            keepalive_secs: 60,
            ..NetConfig::default()
        };
        let listener = listener(&config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let accepted = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("accept: {e}"),
            }
        };
        let sock = socket2::SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
    }

    #[test]
    fn reuse_port_lets_several_listeners_share_a_port() {
        let config = NetConfig::default();
        let first = listener(&config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let second = listener(&config, addr).unwrap();
        assert_eq!(second.local_addr().unwrap(), addr);
    }
}
