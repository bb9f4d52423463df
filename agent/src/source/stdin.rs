//! JSON lines on standard input; the source ends at end of input.

use super::{parse_line, SampleSink, Source, SourceFuture};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

pub struct StdinSource;

impl Source for StdinSource {
    fn name(&self) -> String {
        "stdin".into()
    }

    fn run(self: Box<Self>, sink: SampleSink, cancel: CancellationToken) -> SourceFuture {
        Box::pin(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            let mut n = 0u64;
            loop {
                let line = tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    l = lines.next_line() => l?,
                };
                let Some(line) = line else { return Ok(()) };
                n += 1;
                if line.trim().is_empty() {
                    continue;
                }
                match parse_line(&line) {
                    Ok(s) => {
                        if sink.send(s).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(reason) => sink.reject(&format!("stdin line {n}"), &reason.to_string()),
                }
            }
        })
    }
}
