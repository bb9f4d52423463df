//! A minimal HTTP/1.1 client (GET, `Connection: close`) for the operator API. Enough for tests, the demo
//! and tools; not a general client.

use anyhow::Context;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `GET path` and returns the status code and body.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").context("response has no header end")?;
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("response has no status code")?;
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    let body = if chunked { dechunk(body)? } else { body.to_string() };
    Ok((status, body))
}

/// GET and parse JSON, failing on a non-2xx status.
pub async fn get_json<T: serde::de::DeserializeOwned>(addr: SocketAddr, path: &str) -> anyhow::Result<T> {
    let (status, body) = get(addr, path).await?;
    anyhow::ensure!((200..300).contains(&status), "GET {path}: status {status}: {body}");
    serde_json::from_str(&body).with_context(|| format!("GET {path}: body is not the expected JSON"))
}

fn dechunk(mut s: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").context("bad chunk header")?;
        let n = usize::from_str_radix(size.trim(), 16).context("bad chunk size")?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).context("short chunk")?);
        s = rest.get(n + 2..).context("short chunk")?;
    }
}
