//! The uplink's decisions, with no I/O: which range to send next, when to give up waiting for an
//! acknowledgement and send again, and what an acknowledgement releases.
//!
//! Time is passed in as milliseconds. The I/O shell in [`super`] feeds events in and carries actions out.
//!
//! Invariant: each batch sent *covers* `from..=to` where `from` is the end of the previous batch in this
//! stream plus one, or `acked + 1` after a (re)connect or a resend. So a batch's `from` never claims more than
//! the agent knows is acknowledged or dropped, and the control plane may advance its cumulative watermark
//! over the gap.

use std::collections::VecDeque;

/// Tunables.
#[derive(Debug, Clone, Copy)]
pub struct UplinkParams {
    pub max_inflight_batches: usize,
    pub ack_timeout_ms: u64,
}

/// What the shell should do after [`UplinkState::tick`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    Idle,
    /// No acknowledgement progress within the timeout: the unacknowledged batches will be sent again.
    Resend {
        from: u64,
    },
}

#[derive(Debug, Clone)]
pub struct UplinkState {
    pub params: UplinkParams,
    connected: bool,
    acked: u64,
    /// Next sequence number to read for sending.
    cursor: u64,
    /// `to` of each batch sent and not yet acknowledged, oldest first.
    inflight: VecDeque<u64>,
    last_progress_ms: u64,
}

impl UplinkState {
    /// `acked` is the outbox's persisted acknowledgement.
    pub fn new(params: UplinkParams, acked: u64) -> Self {
        UplinkState {
            params,
            connected: false,
            acked,
            cursor: acked + 1,
            inflight: VecDeque::new(),
            last_progress_ms: 0,
        }
    }

    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// A session started: everything unacknowledged is sent again, from the acknowledgement on.
    pub fn connected(&mut self, now_ms: u64) {
        self.connected = true;
        self.rewind(now_ms);
    }

    pub fn disconnected(&mut self) {
        self.connected = false;
    }

    fn rewind(&mut self, now_ms: u64) {
        self.cursor = self.acked + 1;
        self.inflight.clear();
        self.last_progress_ms = now_ms;
    }

    /// An acknowledgement arrived. Returns the new cumulative value if it moved forward (the shell deletes
    /// up to it from the outbox).
    pub fn ack(&mut self, upto: u64, now_ms: u64) -> Option<u64> {
        if upto <= self.acked {
            return None;
        }
        self.acked = upto;
        while self.inflight.front().is_some_and(|&to| to <= upto) {
            self.inflight.pop_front();
        }
        if self.cursor <= upto {
            self.cursor = upto + 1;
        }
        self.last_progress_ms = now_ms;
        Some(upto)
    }

    /// Where the next batch should start reading, if one may be sent now.
    pub fn next_from(&self) -> Option<u64> {
        (self.connected && self.inflight.len() < self.params.max_inflight_batches).then_some(self.cursor)
    }

    /// A batch covering `from..=to` was handed to the MQTT client.
    pub fn sent(&mut self, from: u64, to: u64, now_ms: u64) {
        debug_assert_eq!(from, self.cursor);
        if self.inflight.is_empty() {
            self.last_progress_ms = now_ms;
        }
        self.inflight.push_back(to);
        self.cursor = to + 1;
    }

    /// Checks the acknowledgement timeout.
    pub fn tick(&mut self, now_ms: u64) -> Tick {
        if self.connected
            && !self.inflight.is_empty()
            && now_ms.saturating_sub(self.last_progress_ms) >= self.params.ack_timeout_ms
        {
            self.rewind(now_ms);
            return Tick::Resend { from: self.cursor };
        }
        Tick::Idle
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn state(acked: u64) -> UplinkState {
        UplinkState::new(UplinkParams { max_inflight_batches: 2, ack_timeout_ms: 1000 }, acked)
    }

    #[test]
    fn sends_only_when_connected_and_window_open() {
        let mut s = state(0);
        assert_eq!(s.next_from(), None);
        s.connected(0);
        assert_eq!(s.next_from(), Some(1));
        s.sent(1, 10, 0);
        assert_eq!(s.next_from(), Some(11));
        s.sent(11, 20, 0);
        assert_eq!(s.next_from(), None, "window of 2 is full");
        assert_eq!(s.ack(10, 5), Some(10));
        assert_eq!(s.next_from(), Some(21));
    }

    #[test]
    fn reconnect_resends_from_ack() {
        let mut s = state(4);
        s.connected(0);
        s.sent(5, 10, 0);
        s.disconnected();
        assert_eq!(s.next_from(), None);
        s.connected(100);
        assert_eq!(s.next_from(), Some(5));
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn ack_timeout_rewinds() {
        let mut s = state(0);
        s.connected(0);
        s.sent(1, 10, 0);
        s.sent(11, 20, 10);
        assert_eq!(s.tick(999), Tick::Idle);
        assert_eq!(s.ack(10, 500), Some(10));
        assert_eq!(s.tick(1499), Tick::Idle, "progress at 500 restarted the clock");
        assert_eq!(s.tick(1500), Tick::Resend { from: 11 });
        assert_eq!(s.next_from(), Some(11));
        assert_eq!(s.tick(5000), Tick::Idle, "nothing in flight, nothing to resend");
    }

    #[test]
    fn stale_and_duplicate_acks_ignored() {
        let mut s = state(0);
        s.connected(0);
        s.sent(1, 10, 0);
        assert_eq!(s.ack(10, 1), Some(10));
        assert_eq!(s.ack(10, 2), None);
        assert_eq!(s.ack(3, 3), None);
        assert_eq!(s.acked(), 10);
    }

    #[test]
    fn ack_past_cursor_moves_cursor() {
        // An ack for records sent before a restart can run ahead of this session's cursor.
        let mut s = state(0);
        s.connected(0);
        assert_eq!(s.ack(50, 1), Some(50));
        assert_eq!(s.next_from(), Some(51));
    }
}
