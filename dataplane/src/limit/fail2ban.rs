//! Fail2ban: when a (credential, model) pair keeps failing with a counted status code, ban the
//! pair. Pure rules over [`PairBans`]; the caller holds the pair's lock and passes `now`.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::config::{BanDuration, Fail2BanConfig, DEFAULT_BAN};

/// What fail2ban does with one status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeRule {
    pub threshold: u32,
    pub duration: RuleDuration,
}

impl CodeRule {
    /// How long a ban by this rule lasts, given the upstream's `Retry-After` (`None`:
    /// permanent).
    pub fn ban_length(&self, retry_after: Option<Duration>) -> Option<Duration> {
        match self.duration {
            RuleDuration::Fixed(BanDuration::Permanent) => None,
            RuleDuration::Fixed(BanDuration::For(d)) => Some(d),
            RuleDuration::RetryAfterOr(d) => Some(retry_after.unwrap_or(d)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleDuration {
    Fixed(BanDuration),
    /// The upstream's `Retry-After`, else this: our safe default for 429.
    RetryAfterOr(Duration),
}

/// The compiled `fail2ban` section.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    rules: HashMap<u16, CodeRule>,
}

impl Policy {
    /// `None` (no section): airouter's safe defaults — 401/403 ban a pair for 5 minutes after
    /// 3 strikes; one 429 cools it down for the provider's `Retry-After` or 60 s; nothing is
    /// permanent.
    pub fn compile(section: Option<&Fail2BanConfig>) -> Self {
        let mut rules = HashMap::new();
        match section {
            None => {
                let auth = CodeRule {
                    threshold: 3,
                    duration: RuleDuration::Fixed(BanDuration::For(DEFAULT_BAN)),
                };
                rules.insert(401, auth);
                rules.insert(403, auth);
                rules.insert(
                    429,
                    CodeRule {
                        threshold: 1,
                        duration: RuleDuration::RetryAfterOr(Duration::from_secs(60)),
                    },
                );
            }
            Some(f) => {
                for &code in &f.error_codes {
                    rules.insert(
                        code,
                        CodeRule {
                            threshold: f.max_attempts,
                            duration: RuleDuration::Fixed(f.ban_duration),
                        },
                    );
                }
                // A rule implies its code is counted (upstream silently ignored rules for codes
                // missing from error_codes).
                for r in &f.error_code_rules {
                    rules.insert(
                        r.code,
                        CodeRule {
                            threshold: r.max_attempts.unwrap_or(f.max_attempts),
                            duration: RuleDuration::Fixed(r.ban_duration.unwrap_or(f.ban_duration)),
                        },
                    );
                }
            }
        }
        Self { rules }
    }

    pub fn rule(&self, code: u16) -> Option<CodeRule> {
        self.rules.get(&code).copied()
    }
}

/// The result of one upstream attempt, as fail2ban sees it.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// The HTTP status, or 502 / 408 for a transport error / timeout.
    pub status: u16,
    /// The upstream's `Retry-After`, if it sent one.
    pub retry_after: Option<Duration>,
    /// False for errors that say nothing about the credential (content policy, context
    /// length): they never count.
    pub counts: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ban {
    pub code: u16,
    /// `None`: permanent (until restart).
    pub until: Option<Instant>,
}

/// Fail2ban state of one pair.
#[derive(Debug, Default)]
pub struct PairBans {
    pub ban: Option<Ban>,
    /// Failures per counted code since the last success.
    pub strikes: Vec<(u16, u32)>,
    /// The last error status seen, for `/health` and the admin state.
    pub last_error: Option<u16>,
}

impl PairBans {
    /// Lifts an expired ban and its counters; true if it did.
    pub fn lift_expired(&mut self, now: Instant) -> bool {
        let expired = self
            .ban
            .as_ref()
            .is_some_and(|ban| ban.until.is_some_and(|until| now >= until));
        if expired {
            self.ban = None;
            self.strikes.clear();
        }
        expired
    }

    /// The active ban, lifting an expired one first.
    pub fn active(&mut self, now: Instant) -> Option<&Ban> {
        self.lift_expired(now);
        self.ban.as_ref()
    }

    /// Applies one outcome; returns the ban it caused, if any.
    pub fn record(&mut self, outcome: Outcome, policy: &Policy, now: Instant) -> Option<Ban> {
        if self.active(now).is_some() {
            return None;
        }
        if (200..300).contains(&outcome.status) {
            self.strikes.clear();
            return None;
        }
        if outcome.status >= 400 {
            self.last_error = Some(outcome.status);
        }
        if !outcome.counts {
            return None;
        }
        let rule = policy.rule(outcome.status)?;
        let count = match self.strikes.iter_mut().find(|(c, _)| *c == outcome.status) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                self.strikes.push((outcome.status, 1));
                1
            }
        };
        if count < rule.threshold {
            return None;
        }
        let ban = Ban {
            code: outcome.status,
            until: rule.ban_length(outcome.retry_after).map(|d| now + d),
        };
        self.ban = Some(ban.clone());
        Some(ban)
    }

    pub fn is_idle(&self) -> bool {
        self.ban.is_none() && self.strikes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ErrorCodeRule;

    fn fail(status: u16) -> Outcome {
        Outcome {
            status,
            retry_after: None,
            counts: true,
        }
    }

    fn explicit() -> Policy {
        Policy::compile(Some(&Fail2BanConfig {
            max_attempts: 3,
            ban_duration: BanDuration::For(Duration::from_secs(10)),
            error_codes: vec![500, 429],
            error_code_rules: vec![ErrorCodeRule {
                code: 401,
                max_attempts: Some(1),
                ban_duration: Some(BanDuration::Permanent),
            }],
        }))
    }

    #[test]
    fn counters_per_code_are_independent() {
        let p = explicit();
        let now = Instant::now();
        let mut b = PairBans::default();
        for s in [500, 500, 429, 429] {
            assert!(b.record(fail(s), &p, now).is_none());
        }
        let ban = b.record(fail(500), &p, now).unwrap();
        assert_eq!(ban.code, 500);
        assert_eq!(ban.until, Some(now + Duration::from_secs(10)));
    }

    #[test]
    fn success_resets_and_expiry_lifts() {
        let p = explicit();
        let now = Instant::now();
        let mut b = PairBans::default();
        b.record(fail(500), &p, now);
        b.record(fail(500), &p, now);
        b.record(fail(200), &p, now);
        assert!(
            b.record(fail(500), &p, now).is_none(),
            "a success reset the count"
        );
        b.record(fail(500), &p, now);
        assert!(b.record(fail(500), &p, now).is_some());
        assert!(b.active(now + Duration::from_secs(9)).is_some());
        assert!(b.active(now + Duration::from_secs(10)).is_none());
        assert!(b.strikes.is_empty());
    }

    #[test]
    fn rule_without_listing_and_permanent() {
        let p = explicit();
        let now = Instant::now();
        let mut b = PairBans::default();
        let ban = b.record(fail(401), &p, now).unwrap();
        assert_eq!(ban.until, None);
        assert!(b.active(now + Duration::from_secs(1_000_000)).is_some());
        let mut b = PairBans::default();
        assert!(b.record(fail(404), &p, now).is_none());
        assert!(b.strikes.is_empty(), "unlisted codes are not counted");
    }

    #[test]
    fn safe_defaults() {
        let p = Policy::compile(None);
        let now = Instant::now();
        let mut b = PairBans::default();
        let ban = b
            .record(
                Outcome {
                    status: 429,
                    retry_after: Some(Duration::from_secs(7)),
                    counts: true,
                },
                &p,
                now,
            )
            .unwrap();
        assert_eq!(ban.until, Some(now + Duration::from_secs(7)));
        let mut b = PairBans::default();
        assert!(b.record(fail(401), &p, now).is_none());
        assert!(b.record(fail(401), &p, now).is_none());
        assert_eq!(
            b.record(fail(401), &p, now).unwrap().until,
            Some(now + Duration::from_secs(300))
        );
        let mut b = PairBans::default();
        for _ in 0..10 {
            assert!(b.record(fail(500), &p, now).is_none());
        }
        let mut b = PairBans::default();
        let policy_error = Outcome {
            counts: false,
            ..fail(401)
        };
        for _ in 0..5 {
            assert!(b.record(policy_error, &p, now).is_none());
        }
    }
}
