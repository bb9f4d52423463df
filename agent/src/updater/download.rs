//! Downloading an artifact (a model, an agent binary) into a staging file: one request at a time, continuing
//! the file from its length with `Range`, never taking more bytes than the signed size.

use edgeloop_common::update::Failure;
use std::path::Path;
use tokio_util::sync::CancellationToken;

/// One HTTP request: continues the staging file from its length.
pub async fn fetch(
    http: &reqwest::Client,
    url: &str,
    part: &Path,
    size: u64,
    cancel: &CancellationToken,
) -> Result<(), Fetch> {
    use tokio::io::AsyncWriteExt;
    let io = |e: std::io::Error| Fetch::Fatal(Failure::Storage, format!("staging file {}: {e}", part.display()));
    if let Some(dir) = part.parent() {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || edgeloop_common::private::dir(&dir))
            .await
            .map_err(|e| Fetch::Fatal(Failure::Storage, e.to_string()))?
            .map_err(|e| Fetch::Fatal(Failure::Storage, e.to_string()))?;
    }
    let mut have = tokio::fs::metadata(part).await.map(|md| md.len()).unwrap_or(0);
    if have > size {
        have = 0;
    }
    if have == size {
        return Ok(());
    }
    let mut req = http.get(url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut resp = tokio::select! {
        _ = cancel.cancelled() => return Err(Fetch::Cancelled),
        r = req.send() => r.map_err(|e| Fetch::Retry(format!("{e}")))?,
    };
    let status = resp.status();
    let append = match status.as_u16() {
        206 if have > 0 => true,
        200 => false,
        404 => {
            return Err(Fetch::Fatal(Failure::Download, format!("{url}: 404, the control plane has no such artifact")))
        }
        // The server is busy, overloaded or restarting: it may answer later.
        s @ (408 | 429) => return Err(Fetch::Retry(format!("{url}: HTTP {s}"))),
        s if s >= 500 => return Err(Fetch::Retry(format!("{url}: HTTP {s}"))),
        s => return Err(Fetch::Fatal(Failure::Download, format!("{url}: HTTP {s}"))),
    };
    if !append {
        have = 0;
    }
    if let Some(len) = resp.content_length() {
        super::state::accept_chunk(have, len as usize, size)
            .map_err(|e| Fetch::Fatal(Failure::Integrity, e.to_string()))?;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .mode(0o600)
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .await
        .map_err(io)?;
    loop {
        let chunk = tokio::select! {
            _ = cancel.cancelled() => {
                let _ = file.sync_data().await;
                return Err(Fetch::Cancelled);
            }
            c = resp.chunk() => c.map_err(|e| Fetch::Retry(format!("{e}"))),
        };
        let chunk = match chunk {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                let _ = file.sync_data().await;
                return Err(e);
            }
        };
        super::state::accept_chunk(have, chunk.len(), size)
            .map_err(|e| Fetch::Fatal(Failure::Integrity, e.to_string()))?;
        file.write_all(&chunk).await.map_err(io)?;
        have += chunk.len() as u64;
    }
    file.sync_data().await.map_err(io)?;
    if have < size {
        return Err(Fetch::Retry(format!("connection closed at {have} of {} bytes", size)));
    }
    Ok(())
}

/// How one download request ended, when it did not end with the whole artifact.
pub enum Fetch {
    /// Network trouble or a busy server: try again after a wait.
    Retry(String),
    /// Retrying cannot help.
    Fatal(Failure, String),
    Cancelled,
}
