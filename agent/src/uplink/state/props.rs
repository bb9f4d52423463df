//! Property tests of the uplink's state machine: random sequences of commits, sends, acknowledgements (in
//! order, stale, duplicated), disconnects, reconnects and time, against what the state machine promises.

use super::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    /// The collector commits `n` more records to the outbox.
    Commit(u64),
    Connect,
    Disconnect,
    /// The driver sends a batch of at most `n` records, if the state lets it.
    Send(u64),
    /// The control plane acknowledges up to the end of the `k`-th batch it has received (counted from the
    /// newest), or repeats an old acknowledgement.
    Ack {
        back: usize,
    },
    Stale {
        back: u64,
    },
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1..20u64).prop_map(Op::Commit),
        1 => Just(Op::Connect),
        1 => Just(Op::Disconnect),
        5 => (1..8u64).prop_map(Op::Send),
        3 => (0..4usize).prop_map(|back| Op::Ack { back }),
        1 => (0..10u64).prop_map(|back| Op::Stale { back }),
        2 => (0..1500u64).prop_map(Op::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn uplink_state_keeps_its_promises(
        window in 1..4usize,
        start in 0..5u64,
        ops in prop::collection::vec(op(), 1..120),
    ) {
        let params = UplinkParams { max_inflight_batches: window, ack_timeout_ms: 1000 };
        let mut s = UplinkState::new(params, start);
        let mut now = 0u64;
        // The outbox: records start+1..=head are committed and not yet deleted.
        let mut head = start;
        // `to` of every batch the control plane received (it acknowledges cumulatively up to one of them).
        let mut received: Vec<u64> = Vec::new();
        // End of the previous batch sent in this stream (reset by a (re)connect or a resend).
        let mut stream_end: Option<u64> = None;
        for op in ops {
            let acked_before = s.acked();
            match op {
                Op::Commit(n) => head += n,
                Op::Connect => {
                    s.connected(now);
                    stream_end = None;
                    prop_assert_eq!(s.inflight(), 0);
                    prop_assert_eq!(s.next_from(), Some(s.acked() + 1), "a session starts at the acknowledgement");
                }
                Op::Disconnect => {
                    s.disconnected();
                    prop_assert_eq!(s.next_from(), None, "nothing is sent while disconnected");
                }
                Op::Send(n) => {
                    if let Some(from) = s.next_from() {
                        prop_assert!(s.is_connected());
                        prop_assert!(s.inflight() < window);
                        // Nothing acknowledged is sent again.
                        prop_assert!(from > s.acked(), "sending from {} with {} acknowledged", from, s.acked());
                        // A batch starts right after the acknowledgement or right after the previous batch.
                        prop_assert!(
                            from == s.acked() + 1 || Some(from - 1) == stream_end,
                            "batch from {} skips records (acked {}, previous batch to {:?})", from, s.acked(), stream_end
                        );
                        if from <= head {
                            let to = (from + n - 1).min(head);
                            s.sent(from, to, now);
                            received.push(to);
                            stream_end = Some(to);
                        }
                    }
                }
                Op::Ack { back } => {
                    if let Some(&upto) = received.iter().rev().nth(back) {
                        let moved = s.ack(upto, now);
                        prop_assert_eq!(moved, (upto > acked_before).then_some(upto));
                    }
                }
                Op::Stale { back } => {
                    let upto = acked_before.saturating_sub(back);
                    prop_assert_eq!(s.ack(upto, now), None, "a stale or repeated acknowledgement moves nothing");
                }
                Op::Advance(ms) => {
                    now += ms;
                    let inflight = s.inflight();
                    match s.tick(now) {
                        Tick::Resend { from } => {
                            prop_assert!(s.is_connected() && inflight > 0);
                            prop_assert_eq!(from, s.acked() + 1, "a resend starts at the acknowledgement");
                            prop_assert_eq!(s.next_from(), Some(from));
                            stream_end = None;
                        }
                        Tick::Idle => {}
                    }
                }
            }
            // The acknowledgement only moves forward, and never past what was sent and committed.
            prop_assert!(s.acked() >= acked_before);
            prop_assert!(s.acked() <= received.iter().copied().max().unwrap_or(start).max(start));
            prop_assert!(s.acked() <= head);
            prop_assert!(s.inflight() <= window);
            // In flight: increasing batch ends, all beyond the acknowledgement.
            let inflight: Vec<u64> = s.inflight.iter().copied().collect();
            prop_assert!(inflight.windows(2).all(|w| w[0] < w[1]), "{:?}", inflight);
            prop_assert!(inflight.iter().all(|&to| to > s.acked()), "{:?} with {} acknowledged", inflight, s.acked());
            if let Some(from) = s.next_from() {
                prop_assert!(from > s.acked());
            }
        }

        // Liveness: connected, and with the control plane acknowledging each batch, everything committed is
        // acknowledged.
        s.connected(now);
        let mut rounds = 0;
        while s.acked() < head {
            let from = s.next_from().expect("connected with an empty window");
            let to = (from + 7).min(head);
            s.sent(from, to, now);
            prop_assert_eq!(s.ack(to, now), Some(to));
            rounds += 1;
            prop_assert!(rounds <= head + 1);
        }
        prop_assert_eq!(s.acked(), head);
    }
}
