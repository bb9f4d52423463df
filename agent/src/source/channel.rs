//! An in-process channel source: whoever holds the sender feeds the agent directly. The fleet runner uses it
//! to run many agents in one process.

use super::{Sample, SampleSink, Source, SourceFuture};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub struct ChannelSource {
    rx: mpsc::Receiver<Sample>,
}

impl ChannelSource {
    /// A source and the sender that feeds it.
    pub fn new(capacity: usize) -> (mpsc::Sender<Sample>, ChannelSource) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, ChannelSource { rx })
    }
}

impl Source for ChannelSource {
    fn name(&self) -> String {
        "channel".into()
    }

    fn run(mut self: Box<Self>, sink: SampleSink, cancel: CancellationToken) -> SourceFuture {
        Box::pin(async move {
            loop {
                let sample = tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    s = self.rx.recv() => s,
                };
                match sample {
                    Some(s) => {
                        if sink.send(s).await.is_err() {
                            return Ok(());
                        }
                    }
                    None => return Ok(()),
                }
            }
        })
    }
}
