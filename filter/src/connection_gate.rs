//! When a TCP connection's peer may be judged, and what the connection's
//! bytes may do until then. Pure: the shim says what the proxy reports and
//! what happened; the gate says what to do. Time is an argument.
//!
//! Why a gate: Envoy calls a network filter's `onNewConnection` when it
//! accepts the TCP connection, before the TLS handshake; at that point the
//! proxy reports no peer certificate, whatever the peer will present. So:
//!
//! - **the peer is judged only when the handshake is over**: at accept when
//!   there is no TLS, or when the proxy already reports the peer certificate;
//!   else on the first downstream byte (a TLS socket delivers application
//!   data only after its handshake) or on a tick that finds the peer
//!   certificate; never on bytes from the upstream, which can come first;
//! - **bytes towards the peer wait for the decision**: what a later filter
//!   writes (an upstream's greeting, a direct response) while the peer is
//!   not judged is held, and dropped if it is denied;
//! - **whether later filters start before the decision** is the config's
//!   [`UpstreamConnect`](crate::config::UpstreamConnect): `Immediate` lets
//!   them start at accept (Envoy's `tcp_proxy` stops reading the downstream
//!   until it has connected upstream, so the handshake cannot end without
//!   it), `AfterDecision` stops the chain at accept and continues it after an
//!   allow — what a server-first upstream needs, because Envoy has no way to
//!   let held upstream bytes go except with the upstream's next ones;
//! - **a TLS peer that shows no certificate for [`HANDSHAKE_TIMEOUT_MS`]** is
//!   closed without being judged: the proxy cannot say whether its handshake
//!   is still running, and judging it as a peer without identity could let a
//!   denied identity through once its handshake ends.

/// How long a TLS connection may go without the proxy reporting a peer
/// certificate (and without sending data) before it is closed. (The shim's
/// message says "10 s".)
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// What the proxy reports about the downstream's TLS session right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handshake {
    /// No TLS on this connection: nothing to wait for.
    Plaintext,
    /// TLS, and the peer has presented its certificate (`connection.mtls`).
    PeerCertificate,
    /// TLS and no peer certificate yet: the handshake may still be running,
    /// or it ended without one.
    NoPeerCertificateYet,
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Accepted; waiting for the TLS handshake to end.
    AwaitingHandshake {
        /// Host time (ms since the Unix epoch) of the accept.
        since_ms: u64,
    },
    /// Being judged, or judged and waiting for the ledger's answer.
    Judging,
    Allowed,
    Closed,
}

/// What the shim does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read the peer's identity and evaluate the policy now, then record the
    /// outcome with [`Gate::judged`].
    Judge,
    /// Nothing to do yet: keep the filter chain stopped, hold the bytes.
    Hold,
    /// Let the bytes pass.
    Pass,
    /// Close the connection without judging: no certificate within
    /// [`HANDSHAKE_TIMEOUT_MS`].
    GiveUp,
}

/// How a judgement ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    Allow,
    Close,
    /// The ledger is asked; the answer judges.
    AwaitLedger,
}

impl Gate {
    /// A new connection, and what the proxy reports at accept. While the
    /// handshake runs, the chain is stopped (`Hold`) if `hold_chain`, else
    /// later filters start (`Pass`).
    pub fn opened(handshake: Handshake, now_ms: u64, hold_chain: bool) -> (Self, Step) {
        match handshake {
            Handshake::Plaintext | Handshake::PeerCertificate => (Self::Judging, Step::Judge),
            Handshake::NoPeerCertificateYet => (
                Self::AwaitingHandshake { since_ms: now_ms },
                if hold_chain { Step::Hold } else { Step::Pass },
            ),
        }
    }

    /// Bytes from the downstream. The proxy delivers them only after the
    /// handshake, so what it reports now is final, certificate or not.
    pub fn downstream_data(&mut self) -> Step {
        match *self {
            Self::AwaitingHandshake { .. } => {
                *self = Self::Judging;
                Step::Judge
            }
            Self::Allowed => Step::Pass,
            Self::Judging | Self::Closed => Step::Hold,
        }
    }

    /// Bytes towards the downstream. Never a reason to judge: they can come
    /// before the handshake is over.
    pub fn upstream_data(&self) -> Step {
        match self {
            Self::Allowed => Step::Pass,
            Self::AwaitingHandshake { .. } | Self::Judging | Self::Closed => Step::Hold,
        }
    }

    /// A tick while waiting for the handshake, with what the proxy reports now.
    pub fn tick(&mut self, handshake: Handshake, now_ms: u64) -> Step {
        let Self::AwaitingHandshake { since_ms } = *self else {
            return Step::Hold;
        };
        match handshake {
            Handshake::PeerCertificate | Handshake::Plaintext => {
                *self = Self::Judging;
                Step::Judge
            }
            Handshake::NoPeerCertificateYet
                if now_ms.saturating_sub(since_ms) >= HANDSHAKE_TIMEOUT_MS =>
            {
                *self = Self::Closed;
                Step::GiveUp
            }
            Handshake::NoPeerCertificateYet => Step::Hold,
        }
    }

    /// Records how a judgement (or the ledger answer it waited for) ended.
    pub fn judged(&mut self, judgement: Judgement) {
        *self = match judgement {
            Judgement::Allow => Self::Allowed,
            Judgement::Close => Self::Closed,
            Judgement::AwaitLedger => Self::Judging,
        };
    }

    /// The downstream connection closed.
    pub fn closed(&mut self) {
        *self = Self::Closed;
    }

    /// Whether ticks should still look at this connection.
    pub fn awaits_handshake(&self) -> bool {
        matches!(self, Self::AwaitingHandshake { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn awaiting() -> Gate {
        let (gate, step) = Gate::opened(Handshake::NoPeerCertificateYet, T0, true);
        assert_eq!(step, Step::Hold);
        gate
    }

    #[test]
    fn tls_accept_without_certificate_waits_instead_of_judging_a_plaintext_peer() {
        let gate = awaiting();
        assert!(gate.awaits_handshake());
    }

    #[test]
    fn immediate_mode_starts_later_filters_but_still_waits_to_judge() {
        let (mut gate, step) = Gate::opened(Handshake::NoPeerCertificateYet, T0, false);
        assert_eq!(step, Step::Pass);
        assert!(gate.awaits_handshake());
        // The upstream's greeting, before the handshake: held, not judged.
        assert_eq!(gate.upstream_data(), Step::Hold);
        assert_eq!(gate.tick(Handshake::PeerCertificate, T0 + 10), Step::Judge);
    }

    #[test]
    fn plaintext_and_known_certificate_are_judged_at_accept() {
        for handshake in [Handshake::Plaintext, Handshake::PeerCertificate] {
            for hold_chain in [true, false] {
                assert_eq!(
                    Gate::opened(handshake, T0, hold_chain),
                    (Gate::Judging, Step::Judge),
                    "{handshake:?}"
                );
            }
        }
    }

    #[test]
    fn upstream_greeting_before_the_handshake_is_held_and_never_judged() {
        let mut gate = awaiting();
        assert_eq!(gate.upstream_data(), Step::Hold);
        assert!(gate.awaits_handshake());
        assert_eq!(
            gate.tick(Handshake::NoPeerCertificateYet, T0 + 1),
            Step::Hold
        );
        assert_eq!(gate.upstream_data(), Step::Hold);
    }

    #[test]
    fn tick_judges_once_the_peer_certificate_is_reported() {
        let mut gate = awaiting();
        assert_eq!(
            gate.tick(Handshake::NoPeerCertificateYet, T0 + 5),
            Step::Hold
        );
        assert_eq!(gate.tick(Handshake::PeerCertificate, T0 + 10), Step::Judge);
        assert!(!gate.awaits_handshake());
        // A second tick in the same round does not judge again.
        assert_eq!(gate.tick(Handshake::PeerCertificate, T0 + 10), Step::Hold);
    }

    #[test]
    fn first_downstream_byte_judges_even_without_certificate() {
        let mut gate = awaiting();
        assert_eq!(gate.downstream_data(), Step::Judge);
        assert_eq!(gate, Gate::Judging);
        // More data while judging (ledger lookup) is held.
        assert_eq!(gate.downstream_data(), Step::Hold);
    }

    #[test]
    fn tls_peer_silent_without_certificate_past_the_timeout_is_closed_unjudged() {
        let mut gate = awaiting();
        let just_before = T0 + HANDSHAKE_TIMEOUT_MS - 1;
        assert_eq!(
            gate.tick(Handshake::NoPeerCertificateYet, just_before),
            Step::Hold
        );
        assert_eq!(
            gate.tick(Handshake::NoPeerCertificateYet, T0 + HANDSHAKE_TIMEOUT_MS),
            Step::GiveUp
        );
        assert_eq!(gate, Gate::Closed);
        assert_eq!(gate.downstream_data(), Step::Hold);
        assert_eq!(gate.upstream_data(), Step::Hold);
    }

    #[test]
    fn host_clock_going_backwards_does_not_time_out() {
        let mut gate = awaiting();
        assert_eq!(
            gate.tick(Handshake::NoPeerCertificateYet, T0 - 60_000),
            Step::Hold
        );
    }

    #[test]
    fn allowed_passes_both_ways_and_closed_holds_both_ways() {
        let mut gate = awaiting();
        assert_eq!(gate.downstream_data(), Step::Judge);
        gate.judged(Judgement::Allow);
        assert_eq!(gate.downstream_data(), Step::Pass);
        assert_eq!(gate.upstream_data(), Step::Pass);
        gate.judged(Judgement::Close);
        assert_eq!(gate.downstream_data(), Step::Hold);
        assert_eq!(gate.upstream_data(), Step::Hold);
    }

    #[test]
    fn ledger_wait_holds_until_the_answer_judges() {
        let (mut gate, _) = Gate::opened(Handshake::PeerCertificate, T0, true);
        gate.judged(Judgement::AwaitLedger);
        assert_eq!(gate.downstream_data(), Step::Hold);
        assert_eq!(gate.upstream_data(), Step::Hold);
        assert_eq!(gate.tick(Handshake::PeerCertificate, T0 + 1), Step::Hold);
        gate.judged(Judgement::Allow);
        assert_eq!(gate.upstream_data(), Step::Pass);
    }

    #[test]
    fn downstream_close_while_waiting_stops_the_ticks() {
        let mut gate = awaiting();
        gate.closed();
        assert!(!gate.awaits_handshake());
        assert_eq!(gate.tick(Handshake::PeerCertificate, T0 + 1), Step::Hold);
    }
}
