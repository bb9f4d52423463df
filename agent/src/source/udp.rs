//! JSON lines over UDP. One datagram may carry several lines. Bad lines are counted with the sender's
//! address, and the listener goes on.

use super::{parse_line, SampleSink, Source, SourceFuture};
use anyhow::Context;
use std::net::SocketAddr;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

pub struct UdpSource {
    socket: UdpSocket,
}

impl UdpSource {
    /// Binds now, so that a bad address fails at start-up.
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<UdpSource> {
        let socket = UdpSocket::bind(addr).await.with_context(|| format!("binding the UDP source to {addr}"))?;
        Ok(UdpSource { socket })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

impl Source for UdpSource {
    fn name(&self) -> String {
        format!("udp {}", self.local_addr().map(|a| a.to_string()).unwrap_or_default())
    }

    fn run(self: Box<Self>, sink: SampleSink, cancel: CancellationToken) -> SourceFuture {
        Box::pin(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let (n, from) = tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    r = self.socket.recv_from(&mut buf) => r.context("receiving on the UDP source")?,
                };
                let origin = format!("udp from {from}");
                let Ok(text) = std::str::from_utf8(&buf[..n]) else {
                    sink.reject(&origin, "datagram is not UTF-8");
                    continue;
                };
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    match parse_line(line) {
                        Ok(s) => {
                            if sink.send(s).await.is_err() {
                                return Ok(());
                            }
                        }
                        Err(reason) => sink.reject(&origin, &reason.to_string()),
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;
    use std::sync::Arc;

    #[tokio::test]
    async fn datagrams_of_lines_become_samples_and_junk_is_counted() {
        let src = UdpSource::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = src.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let health = Arc::new(Health::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(Box::new(src).run(SampleSink::new(tx, health.clone()), cancel.clone()));
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(b"{\"sensor\":\"a\",\"values\":[1]}\nnot json\n{\"sensor\":\"b\",\"values\":[2,3]}\n", addr)
            .await
            .unwrap();
        sock.send_to(&[0xff, 0xfe], addr).await.unwrap();
        sock.send_to(b"{\"sensor\":\"c\",\"values\":[4]}", addr).await.unwrap();
        let names: Vec<String> =
            vec![rx.recv().await.unwrap().sensor, rx.recv().await.unwrap().sensor, rx.recv().await.unwrap().sensor];
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(health.bad_samples.load(std::sync::atomic::Ordering::Relaxed), 2);
        cancel.cancel();
        task.await.unwrap().unwrap();
    }
}
