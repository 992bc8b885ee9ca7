//! Rate limits and bans: the state that decides whether a (credential, model) pair may take
//! one more request.
//!
//! The state is in process: [`CredState`], one lock per credential, held for a few hundred
//! nanoseconds and never across an `.await`. [`LocalLimits`] admits against it, with whole
//! limits or a replica's share of them; the Redis backend ([`shared::SharedLimits`]) admits
//! against windows shared by every replica, mirrors what it decided into the local state (for
//! `/health`, the admin state and metrics) and falls back on a replica's share when Redis does
//! not answer.

pub mod fail2ban;
pub mod shared;
mod window;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

pub use self::window::WINDOW;
use self::{
    fail2ban::{Ban, Outcome, PairBans, Policy},
    window::Window,
};
use crate::{config::Limit, FastMap};

/// The limits that apply to one admission: the credential's and the pair's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotLimits {
    pub rpm: Limit,
    pub tpm: Limit,
    pub model_rpm: Limit,
    pub model_tpm: Limit,
}

impl SlotLimits {
    /// The pair has limits of its own (so its windows must be kept).
    pub fn has_pair_limits(&self) -> bool {
        self.model_rpm != Limit::Unlimited || self.model_tpm != Limit::Unlimited
    }

    /// Every limit divided among `parts` replicas ([`Limit::share`]).
    pub fn share(self, parts: u32) -> SlotLimits {
        SlotLimits {
            rpm: self.rpm.share(parts),
            tpm: self.tpm.share(parts),
            model_rpm: self.model_rpm.share(parts),
            model_tpm: self.model_tpm.share(parts),
        }
    }
}

/// The answer to "may this pair take one more request now?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Admitted; one request has been recorded on the credential and the pair windows.
    Admitted,
    /// The pair is banned until then (`None`: permanently).
    Banned { until: Option<Instant> },
    /// A window is full; it frees up then (`None`: not known).
    Limited { frees_at: Option<Instant> },
}

/// A pair the backend is asked about: `state` is the in-process state of its credential.
#[derive(Clone, Copy)]
pub struct SlotRef<'a> {
    pub state: &'a CredState,
    pub model: &'a str,
    pub limits: SlotLimits,
}

/// The in-process backend: each replica enforces its own windows, against whole limits
/// ([`LocalLimits::WHOLE`]) or, as the Redis backend's fallback, against its share of them.
#[derive(Clone, Copy, Debug)]
pub struct LocalLimits {
    parts: u32,
}

impl LocalLimits {
    pub const WHOLE: LocalLimits = LocalLimits { parts: 1 };

    /// Each limit divided among `replicas` ([`SlotLimits::share`]).
    pub fn share_of(replicas: u32) -> LocalLimits {
        LocalLimits {
            parts: replicas.max(1),
        }
    }

    /// Atomically checks the ban and every window of the slot and, if all pass, records one
    /// request on both the credential and the pair.
    pub fn admit(&self, slot: SlotRef<'_>, now: Instant) -> Admission {
        let limits = if self.parts > 1 {
            slot.limits.share(self.parts)
        } else {
            slot.limits
        };
        slot.state.admit(slot.model, &limits, now)
    }
}

/// Above this many pairs, idle ones (empty windows, no ban, no strikes) are dropped.
const MAX_IDLE_PAIRS: usize = 1024;
/// Past this many active pairs, pairs without limits of their own are not tracked.
const MAX_PAIRS: usize = 4096;
/// Past this many, not even a failure that may ban the pair is tracked (a client's made-up
/// model names must not grow the map without bound while a provider refuses every one).
const MAX_STRIKE_PAIRS: usize = 4 * MAX_PAIRS;

/// Windows and bans of one credential and its pairs. Carried across config reloads while the
/// credential's name still exists.
#[derive(Debug, Default)]
pub struct CredState {
    inner: Mutex<CredInner>,
}

#[derive(Debug, Default)]
struct CredInner {
    rpm: Window,
    tpm: Window,
    pairs: FastMap<Arc<str>, PairState>,
    /// Models whose ban expired since the last [`CredState::take_unbans`] (for metrics).
    unbans: Vec<Arc<str>>,
}

/// Expired bans remembered for metrics while nobody scrapes.
const MAX_UNBAN_EVENTS: usize = 1024;

#[derive(Debug, Default)]
struct PairState {
    rpm: Window,
    tpm: Window,
    bans: PairBans,
}

impl PairState {
    /// Nothing in the windows (expired events pruned first) and no ban or strike.
    fn is_idle(&mut self, now: Instant) -> bool {
        self.rpm.sum(now) == 0 && self.tpm.sum(now) == 0 && self.bans.is_idle()
    }

    /// Lifts the pair's ban if it has expired, and remembers the unban in `unbans` for the
    /// metrics. Every reader of the ban calls this first, so whoever sees the expiry first
    /// (a request, `/health`, the operator's poll of `/admin/state`) counts it.
    fn lift_expired(&mut self, model: &str, unbans: &mut Vec<Arc<str>>, now: Instant) {
        if self.bans.lift_expired(now) && unbans.len() < MAX_UNBAN_EVENTS {
            unbans.push(Arc::from(model));
        }
    }
}

impl CredInner {
    /// Makes sure the pair has state; returns `false` (and keeps none) when the map is full of
    /// active pairs and this one needs no state of its own: with no `models[]` filter a client
    /// can send any number of made-up model names, and each would otherwise hold memory for a
    /// minute. A pair with its own limits (`required`) always gets state.
    fn ensure_pair(&mut self, model: &str, required: bool, now: Instant) -> bool {
        if self.pairs.contains_key(model) {
            return true;
        }
        if self.pairs.len() >= MAX_IDLE_PAIRS {
            self.pairs.retain(|_, p| !p.is_idle(now));
        }
        if self.pairs.len() >= MAX_PAIRS && !required {
            return false;
        }
        self.pairs.insert(Arc::from(model), PairState::default());
        true
    }
}

/// A point-in-time view of one pair, for `/health` and the admin state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairUsage {
    pub model: String,
    pub rpm: u64,
    pub tpm: u64,
    pub ban: Option<Ban>,
    pub strikes: Vec<(u16, u32)>,
    pub last_error: Option<u16>,
}

/// A point-in-time view of one credential.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredUsage {
    pub rpm: u64,
    pub tpm: u64,
    pub pairs: Vec<PairUsage>,
}

impl CredUsage {
    /// Some model of the credential is banned.
    pub fn any_ban(&self) -> bool {
        self.pairs.iter().any(|p| p.ban.is_some())
    }

    /// The credential's own RPM or TPM window is full.
    pub fn at_limit(&self, rpm: Limit, tpm: Limit) -> bool {
        rpm.get().is_some_and(|l| self.rpm >= l) || tpm.get().is_some_and(|l| self.tpm >= l)
    }
}

impl CredState {
    pub fn admit(&self, model: &str, limits: &SlotLimits, now: Instant) -> Admission {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let tracked = inner.ensure_pair(model, limits.has_pair_limits(), now);
        let CredInner {
            rpm,
            tpm,
            pairs,
            unbans,
        } = inner;
        let mut pair = if tracked { pairs.get_mut(model) } else { None };
        if let Some(pair) = pair.as_deref_mut() {
            pair.lift_expired(model, unbans, now);
            if let Some(ban) = &pair.bans.ban {
                return Admission::Banned { until: ban.until };
            }
        }
        let mut frees_at: Option<Instant> = None;
        let mut full = false;
        let mut check = |window: &mut Window, limit: Limit| {
            if !window.has_room(now, limit.get()) {
                full = true;
                frees_at = later(frees_at, window.frees_at(limit.get().unwrap_or(0)));
            }
        };
        check(rpm, limits.rpm);
        check(tpm, limits.tpm);
        if let Some(pair) = pair.as_deref_mut() {
            check(&mut pair.rpm, limits.model_rpm);
            check(&mut pair.tpm, limits.model_tpm);
        }
        if full {
            return Admission::Limited { frees_at };
        }
        if let Some(pair) = pair {
            pair.rpm.add(now, 1);
        }
        rpm.add(now, 1);
        Admission::Admitted
    }

    pub fn charge_tokens(&self, model: &str, tokens: u64, now: Instant) {
        if tokens == 0 {
            return;
        }
        let mut inner = self.inner.lock();
        inner.tpm.add(now, tokens);
        if inner.ensure_pair(model, false, now) {
            if let Some(pair) = inner.pairs.get_mut(model) {
                pair.tpm.add(now, tokens);
            }
        }
    }

    pub fn record_outcome(
        &self,
        model: &str,
        outcome: Outcome,
        policy: &Policy,
        now: Instant,
    ) -> Option<Ban> {
        let mut inner = self.inner.lock();
        if (200..300).contains(&outcome.status) && !inner.pairs.contains_key(model) {
            return None; // nothing to reset
        }
        // A failure that may ban the pair is tracked even when the map is full of pairs.
        let may_ban = outcome.counts && policy.rule(outcome.status).is_some();
        let required = may_ban && inner.pairs.len() < MAX_STRIKE_PAIRS;
        if !inner.ensure_pair(model, required, now) {
            return None;
        }
        let CredInner { pairs, unbans, .. } = &mut *inner;
        let pair = pairs.get_mut(model)?;
        pair.lift_expired(model, unbans, now);
        pair.bans.record(outcome, policy, now)
    }

    /// Records a request the shared backend admitted (this replica's view, for `/health`,
    /// the admin state and the local fallback).
    pub fn mirror_admitted(&self, model: &str, limits: &SlotLimits, now: Instant) {
        let mut inner = self.inner.lock();
        inner.rpm.add(now, 1);
        if !inner.ensure_pair(model, limits.has_pair_limits(), now) {
            return;
        }
        let CredInner { pairs, unbans, .. } = &mut *inner;
        if let Some(pair) = pairs.get_mut(model) {
            pair.rpm.add(now, 1);
            // Redis admitted the pair, so it holds no ban for it (expired, or lost with Redis's
            // data): a copy kept here would go on showing, and enforce while Redis is out, a
            // ban that is gone.
            if pair.bans.ban.take().is_some() {
                pair.bans.strikes.clear();
                if unbans.len() < MAX_UNBAN_EVENTS {
                    unbans.push(Arc::from(model));
                }
            }
        }
    }

    /// Records a ban the shared backend reported, and the outcome's status (when it is an
    /// error) as the last error. A success clears the strikes this replica counted on its own
    /// (while Redis was out), as it clears Redis's.
    pub fn mirror_ban(&self, model: &str, status: Option<u16>, ban: Option<Ban>) {
        if status.is_some_and(|s| (200..300).contains(&s)) {
            if let Some(pair) = self.inner.lock().pairs.get_mut(model) {
                pair.bans.strikes.clear();
            }
            return;
        }
        let error = status.filter(|s| *s >= 400);
        if error.is_none() && ban.is_none() {
            return;
        }
        let mut inner = self.inner.lock();
        if !inner.ensure_pair(model, ban.is_some(), Instant::now()) {
            return;
        }
        if let Some(pair) = inner.pairs.get_mut(model) {
            if error.is_some() {
                pair.bans.last_error = error;
            }
            if let Some(ban) = ban {
                pair.bans.strikes.clear();
                pair.bans.ban = Some(ban);
            }
        }
    }

    /// Models whose ban expired since the last call.
    pub fn take_unbans(&self) -> Vec<Arc<str>> {
        std::mem::take(&mut self.inner.lock().unbans)
    }

    /// Lifts every ban and strike (the key behind the credential changed).
    pub fn clear_bans(&self) {
        let mut inner = self.inner.lock();
        for pair in inner.pairs.values_mut() {
            pair.bans = PairBans::default();
        }
    }

    pub fn usage(&self, now: Instant) -> CredUsage {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let unbans = &mut inner.unbans;
        let mut pairs: Vec<PairUsage> = inner
            .pairs
            .iter_mut()
            .map(|(model, p)| {
                p.lift_expired(model, unbans, now);
                PairUsage {
                    model: model.to_string(),
                    rpm: p.rpm.sum(now),
                    tpm: p.tpm.sum(now),
                    ban: p.bans.ban.clone(),
                    strikes: p.bans.strikes.clone(),
                    last_error: p.bans.last_error,
                }
            })
            .collect();
        pairs.sort_by(|a, b| a.model.cmp(&b.model));
        CredUsage {
            rpm: inner.rpm.sum(now),
            tpm: inner.tpm.sum(now),
            pairs,
        }
    }
}

/// The later of two "frees at" moments: a slot is free only when all its full windows are.
fn later(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Seconds until `at`, rounded up, at least 1: the value of a `Retry-After` header.
pub fn retry_after_secs(at: Instant, now: Instant) -> u64 {
    let d = at.saturating_duration_since(now);
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// The longest cool-down an upstream's `Retry-After` can ask for. A far-off or bogus value
/// must not park a key for days (or overflow the clock); a key still out of quota after an
/// hour costs one more 429 an hour.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Parses an upstream `Retry-After` given in seconds (the HTTP-date form is ignored), at most
/// [`MAX_RETRY_AFTER`].
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs = value.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: u64, model_rpm: Limit) -> SlotLimits {
        SlotLimits {
            rpm: Limit::PerMinute(rpm),
            model_rpm,
            ..Default::default()
        }
    }

    #[test]
    fn admits_up_to_the_limit_then_reports_when_it_frees() {
        let s = CredState::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(
                s.admit("m", &limits(3, Limit::Unlimited), t0),
                Admission::Admitted
            );
        }
        assert_eq!(
            s.admit(
                "m",
                &limits(3, Limit::Unlimited),
                t0 + Duration::from_secs(1)
            ),
            Admission::Limited {
                frees_at: Some(t0 + WINDOW)
            }
        );
        assert_eq!(
            s.admit("m", &limits(3, Limit::Unlimited), t0 + WINDOW),
            Admission::Admitted
        );
    }

    #[test]
    fn a_full_pair_records_nothing_on_the_credential() {
        let s = CredState::default();
        let t0 = Instant::now();
        let l = limits(100, Limit::PerMinute(1));
        assert_eq!(s.admit("m", &l, t0), Admission::Admitted);
        assert!(matches!(s.admit("m", &l, t0), Admission::Limited { .. }));
        assert_eq!(s.usage(t0).rpm, 1, "the refused request was not counted");
        assert_eq!(
            s.admit("other", &l, t0),
            Admission::Admitted,
            "pairs are separate"
        );
    }

    #[test]
    fn an_expired_ban_is_counted_once_by_whoever_sees_it_first() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(2);
        let ban = || Ban {
            code: 401,
            until: Some(t0 + Duration::from_secs(1)),
        };
        let unbans = |s: &CredState| {
            s.take_unbans()
                .iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>()
        };
        // Seen by a reader of the state (`/health`, `/admin/state`, a scrape) first…
        let s = CredState::default();
        s.mirror_ban("m", Some(401), Some(ban()));
        assert!(s.usage(t0).pairs[0].ban.is_some());
        assert!(unbans(&s).is_empty());
        assert!(s.usage(later).pairs[0].ban.is_none());
        assert_eq!(
            s.admit("m", &SlotLimits::default(), later),
            Admission::Admitted
        );
        assert_eq!(unbans(&s), ["m"], "counted by the reader, and only once");
        // …by a request…
        s.mirror_ban(
            "m",
            Some(401),
            Some(Ban {
                until: Some(later + Duration::from_secs(1)),
                ..ban()
            }),
        );
        let after = later + Duration::from_secs(2);
        assert_eq!(
            s.admit("m", &SlotLimits::default(), after),
            Admission::Admitted
        );
        assert!(s.usage(after).pairs[0].ban.is_none());
        assert_eq!(unbans(&s), ["m"]);
        // …or by an outcome.
        let s = CredState::default();
        s.mirror_ban("m", Some(401), Some(ban()));
        let ok = fail2ban::Outcome {
            status: 200,
            retry_after: None,
            counts: true,
        };
        assert_eq!(
            s.record_outcome("m", ok, &fail2ban::Policy::compile(None), later),
            None
        );
        assert_eq!(unbans(&s), ["m"]);
    }

    #[test]
    fn tokens_fill_the_tpm_window() {
        let s = CredState::default();
        let t0 = Instant::now();
        let l = SlotLimits {
            tpm: Limit::PerMinute(20),
            ..Default::default()
        };
        assert_eq!(s.admit("m", &l, t0), Admission::Admitted);
        s.charge_tokens("m", 12, t0);
        assert_eq!(s.admit("m", &l, t0), Admission::Admitted, "12 < 20");
        s.charge_tokens("m", 12, t0);
        assert!(matches!(s.admit("m", &l, t0), Admission::Limited { .. }));
        let u = s.usage(t0);
        assert_eq!((u.rpm, u.tpm, u.pairs[0].tpm), (2, 24, 24));
    }

    #[test]
    fn made_up_models_cannot_grow_pair_state_without_bound() {
        let s = CredState::default();
        let t0 = Instant::now();
        let unlimited = SlotLimits::default();
        for i in 0..(MAX_PAIRS + 500) {
            assert_eq!(
                s.admit(&format!("m{i}"), &unlimited, t0),
                Admission::Admitted
            );
        }
        assert_eq!(s.inner.lock().pairs.len(), MAX_PAIRS);
        assert_eq!(
            s.usage(t0).rpm,
            (MAX_PAIRS + 500) as u64,
            "the credential window still counts them all"
        );
        // A pair with limits of its own is still enforced.
        let limited = SlotLimits {
            model_rpm: Limit::PerMinute(1),
            ..Default::default()
        };
        assert_eq!(s.admit("configured", &limited, t0), Admission::Admitted);
        assert!(matches!(
            s.admit("configured", &limited, t0),
            Admission::Limited { .. }
        ));
    }

    #[test]
    fn a_full_map_still_bans_and_makes_room_once_its_windows_expire() {
        let s = CredState::default();
        let t0 = Instant::now();
        let unlimited = SlotLimits::default();
        for i in 0..MAX_PAIRS {
            s.admit(&format!("m{i}"), &unlimited, t0);
        }
        // Full of active pairs: a failure that may ban is still counted for a new model.
        let policy = fail2ban::Policy::compile(None);
        let limited = fail2ban::Outcome {
            status: 429,
            retry_after: None,
            counts: true,
        };
        let ban = s.record_outcome("victim", limited, &policy, t0);
        assert!(ban.is_some(), "one 429 cools the pair down");
        assert!(matches!(
            s.admit("victim", &unlimited, t0),
            Admission::Banned { .. }
        ));
        // A minute later the old pairs are idle, though nobody read their windows since: a
        // new model is tracked again.
        let later = t0 + WINDOW + Duration::from_secs(1);
        s.admit("new", &unlimited, later);
        assert!(s.inner.lock().pairs.contains_key("new"));
        assert!(s.inner.lock().pairs.len() < MAX_PAIRS);
    }

    #[test]
    fn an_admission_by_redis_drops_a_ban_copy_redis_no_longer_holds() {
        let s = CredState::default();
        let now = Instant::now();
        let permanent = Ban {
            code: 401,
            until: None,
        };
        s.mirror_ban("m", Some(401), Some(permanent));
        assert!(s.usage(now).any_ban());
        s.mirror_admitted("m", &SlotLimits::default(), now);
        assert!(!s.usage(now).any_ban());
        assert_eq!(s.take_unbans(), [Arc::from("m")]);
        assert_eq!(
            s.admit("m", &SlotLimits::default(), now),
            Admission::Admitted
        );
    }

    #[test]
    fn a_success_seen_through_redis_clears_the_strikes_counted_here() {
        let s = CredState::default();
        let now = Instant::now();
        let failed = fail2ban::Outcome {
            status: 401,
            retry_after: None,
            counts: true,
        };
        let policy = fail2ban::Policy::compile(None);
        assert_eq!(s.record_outcome("m", failed, &policy, now), None);
        assert_eq!(s.usage(now).pairs[0].strikes, [(401, 1)]);
        s.mirror_ban("m", Some(200), None);
        assert!(s.usage(now).pairs[0].strikes.is_empty());
    }

    #[test]
    fn the_local_share_divides_every_limit_but_never_to_zero() {
        let share = SlotLimits {
            rpm: Limit::PerMinute(10),
            tpm: Limit::Unlimited,
            model_rpm: Limit::PerMinute(2),
            model_tpm: Limit::PerMinute(3000),
        }
        .share(3);
        assert_eq!(
            share,
            SlotLimits {
                rpm: Limit::PerMinute(3),
                tpm: Limit::Unlimited,
                model_rpm: Limit::PerMinute(1),
                model_tpm: Limit::PerMinute(1000),
            }
        );
    }

    #[test]
    fn an_upstream_retry_after_is_seconds_up_to_an_hour() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("3601"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            parse_retry_after(&u64::MAX.to_string()),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn retry_after_rounds_up() {
        let now = Instant::now();
        assert_eq!(retry_after_secs(now + Duration::from_millis(1500), now), 2);
        assert_eq!(retry_after_secs(now, now), 1);
    }
}
