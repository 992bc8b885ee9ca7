//! Credential selection: round-robin per model over primaries, then over fallbacks, skipping
//! pairs that are banned or rate-limited. [`select`] does no I/O and reads no clock: the caller
//! passes the in-process limiter and `now`; admission through [`LocalLimits::admit`] reserves the
//! RPM slot atomically, so a credential never admits more than its limit however many requests
//! race. [`select_shared`] walks the same candidates but lets Redis admit (one call per
//! request), falling back on [`select`] with each replica's share when Redis does not answer.

use std::{ops::ControlFlow, time::Instant};

use crate::{
    config::CredentialType,
    limit::{
        fail2ban::Ban,
        shared::{self, Refusal, SharedLimits},
        Admission, LocalLimits, SlotRef,
    },
    remote::RemoteHealth,
    runtime::{Cursor, Route, Runtime, Slot, Tier},
};

/// A credential that admitted the request.
#[derive(Debug)]
pub struct Pick<'r> {
    pub slot: &'r Slot,
    pub tier: Tier,
    /// The candidates passed over on the way, for metrics.
    pub skipped: Exhausted,
    /// Whether a success must be sent to the shared backend to reset fail2ban strikes: what
    /// Redis said of the admitted pair, or true when the pick was not Redis's (unknown).
    pub strikes: bool,
}

/// Why nothing could be picked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exhausted {
    /// Candidates skipped for a full window.
    pub rate_limited: usize,
    /// Candidates skipped for a ban.
    pub banned: usize,
    /// Proxy candidates whose remote reported the model unavailable at the last sync.
    pub remote_refused: usize,
    /// The earliest moment one of them frees up, if any will.
    pub frees_at: Option<Instant>,
}

/// One credential selection may try: a slot and where it sits in its tier.
#[derive(Clone, Copy, Debug)]
struct Candidate<'r> {
    slot: &'r Slot,
    tier: Tier,
    position: usize,
}

impl<'r> Candidate<'r> {
    /// The candidate admitted the request: the cursor moves past it.
    fn pick(self, cursor: &Cursor, skipped: Exhausted, strikes: bool) -> Pick<'r> {
        cursor.advance_past(self.tier, self.position);
        Pick {
            slot: self.slot,
            tier: self.tier,
            skipped,
            strikes,
        }
    }
}

/// What one selection walks: the route of `model_id`, its cursor, the credentials this
/// request has tried, and the remotes' last word on the model.
#[derive(Clone, Copy)]
pub struct Query<'r, 'q> {
    pub rt: &'r Runtime,
    pub route: &'r Route,
    pub model_id: &'q str,
    pub cursor: &'q Cursor,
    pub tried: &'q [usize],
    pub remote: &'q RemoteHealth,
}

/// Calls `visit` with each candidate of `q` in selection order (round-robin from the cursor,
/// primaries before fallbacks), skipping credentials already tried and proxies whose remote
/// refuses the model (counted in `exhausted`), until `visit` breaks.
fn candidates<'r, T>(
    q: Query<'r, '_>,
    exhausted: &mut Exhausted,
    mut visit: impl FnMut(Candidate<'r>, &mut Exhausted) -> ControlFlow<T>,
) -> Option<T> {
    let Query {
        rt,
        route,
        model_id,
        cursor,
        tried,
        remote,
    } = q;
    for tier in [Tier::Primary, Tier::Fallback] {
        let slots = &route.tiers[tier as usize];
        let n = slots.len();
        if n == 0 {
            continue;
        }
        let start = cursor.start(tier) % n;
        for offset in 0..n {
            let position = (start + offset) % n;
            let slot = &slots[position];
            if tried.contains(&slot.cred) {
                continue;
            }
            let cred = &rt.credentials[slot.cred];
            if cred.kind == CredentialType::Proxy && remote.refuses(&cred.name, model_id) {
                exhausted.remote_refused += 1;
                continue;
            }
            let candidate = Candidate {
                slot,
                tier,
                position,
            };
            if let ControlFlow::Break(t) = visit(candidate, exhausted) {
                return Some(t);
            }
        }
    }
    None
}

impl Exhausted {
    /// Counts a candidate that did not admit the request.
    fn refused(&mut self, admission: Admission) {
        let frees_at = match admission {
            Admission::Admitted => return,
            Admission::Banned { until } => {
                self.banned += 1;
                until
            }
            Admission::Limited { frees_at } => {
                self.rate_limited += 1;
                frees_at
            }
        };
        self.frees_at = match (self.frees_at, frees_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// Picks the next credential of `q` not yet tried, admitting it.
pub fn select<'r>(
    q: Query<'r, '_>,
    limits: &LocalLimits,
    now: Instant,
) -> Result<Pick<'r>, Exhausted> {
    let rt = q.rt;
    let mut exhausted = Exhausted::default();
    let picked = candidates(q, &mut exhausted, |c, exhausted| {
        let admission = limits.admit(
            SlotRef {
                state: &rt.credentials[c.slot.cred].state,
                model: q.model_id,
                limits: rt.slot_limits(c.slot),
            },
            now,
        );
        match admission {
            Admission::Admitted => ControlFlow::Break(c),
            refused => {
                exhausted.refused(refused);
                ControlFlow::Continue(())
            }
        }
    });
    match picked {
        Some(c) => Ok(c.pick(q.cursor, exhausted, true)),
        None => Err(exhausted),
    }
}

/// [`select`] with the Redis backend: every candidate goes to Redis in one call, which admits
/// the first with room. When Redis does not answer, the local share decides
/// ([`SharedLimits::fallback`]).
pub async fn select_shared<'r>(
    q: Query<'r, '_>,
    shared: &SharedLimits,
) -> Result<Pick<'r>, Exhausted> {
    let Query {
        rt,
        model_id,
        cursor,
        ..
    } = q;
    if shared.available() {
        let mut exhausted = Exhausted::default();
        let mut listed: Vec<Candidate<'r>> = Vec::new();
        candidates::<()>(q, &mut exhausted, |c, _| {
            listed.push(c);
            ControlFlow::Continue(())
        });
        if listed.is_empty() {
            return Err(exhausted);
        }
        let asked: Vec<shared::Candidate<'_>> = listed
            .iter()
            .map(|c| shared::Candidate {
                credential: &rt.credentials[c.slot.cred].name,
                ban_scope: &rt.credentials[c.slot.cred].ban_scope,
                limits: rt.slot_limits(c.slot),
            })
            .collect();
        if let Ok(verdicts) = shared.admit(model_id, &asked).await {
            for (c, refusal) in listed.iter().zip(&verdicts.refused) {
                if let Refusal::Banned { code, until } = *refusal {
                    let ban = Ban { code, until };
                    rt.credentials[c.slot.cred]
                        .state
                        .mirror_ban(model_id, None, Some(ban));
                }
                exhausted.refused(refusal.admission());
            }
            let Some(c) = verdicts.admitted.map(|i| listed[i]) else {
                return Err(exhausted);
            };
            rt.credentials[c.slot.cred].state.mirror_admitted(
                model_id,
                &rt.slot_limits(c.slot),
                Instant::now(),
            );
            return Ok(c.pick(cursor, exhausted, verdicts.strikes));
        }
    }
    select(q, &shared.fallback(), Instant::now())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        config::RouterConfig,
        limit::{
            fail2ban::{Outcome, Policy},
            LocalLimits,
        },
        remote::RemoteStatus,
        runtime::{Lookup, Registry},
    };

    fn runtime(yaml: &str) -> Runtime {
        let config = RouterConfig::from_yaml(yaml, &|_| None).unwrap().config;
        Runtime::compile(config, Arc::new(Registry::default()))
    }

    fn names(rt: &Runtime, model: &str, n: usize) -> Vec<String> {
        let Lookup::Route(route) = rt.lookup(model) else {
            panic!("no route")
        };
        let cursor = rt.cursor(model);
        let now = Instant::now();
        (0..n)
            .map(|_| {
                match select(
                    Query {
                        rt,
                        route,
                        model_id: model,
                        cursor: &cursor,
                        tried: &[],
                        remote: &RemoteHealth::default(),
                    },
                    &LocalLimits::WHOLE,
                    now,
                ) {
                    Ok(p) => rt.credentials[p.slot.cred].name.to_string(),
                    Err(_) => "-".to_string(),
                }
            })
            .collect()
    }

    const THREE: &str = "server: {master_key: k}\ncredentials:\n\
        - {name: c1, type: openai, api_key: x, base_url: 'http://h'}\n\
        - {name: c2, type: openai, api_key: x, base_url: 'http://h', rpm: 1}\n\
        - {name: c3, type: openai, api_key: x, base_url: 'http://h'}\n\
        - {name: f1, type: proxy, base_url: 'http://h', is_fallback: true, rpm: 1}\n\
        - {name: f2, type: proxy, base_url: 'http://h', is_fallback: true, rpm: 1}\n";

    #[test]
    fn round_robin_skips_limited_without_moving_past_them() {
        let rt = runtime(THREE);
        assert_eq!(names(&rt, "m", 6), ["c1", "c2", "c3", "c1", "c3", "c1"]);
    }

    #[test]
    fn cursors_are_per_model() {
        let rt = runtime(THREE);
        assert_eq!(names(&rt, "a", 1), ["c1"]);
        assert_eq!(names(&rt, "b", 1), ["c1"]);
        assert_eq!(names(&rt, "a", 1), ["c2"]);
    }

    #[test]
    fn fallbacks_only_after_primaries_then_exhaustion() {
        let yaml = THREE.replace("base_url: 'http://h'}", "base_url: 'http://h', rpm: 1}");
        let rt = runtime(&yaml);
        assert_eq!(names(&rt, "m", 6), ["c1", "c2", "c3", "f1", "f2", "-"]);
        let Lookup::Route(route) = rt.lookup("m") else {
            panic!()
        };
        let err = select(
            Query {
                rt: &rt,
                route,
                model_id: "m",
                cursor: &rt.cursor("m"),
                tried: &[],
                remote: &RemoteHealth::default(),
            },
            &LocalLimits::WHOLE,
            Instant::now(),
        )
        .unwrap_err();
        assert_eq!(err.rate_limited, 5);
        assert!(err.frees_at.is_some());
    }

    #[test]
    fn banned_pairs_are_skipped_and_tried_are_excluded() {
        let rt = runtime(THREE);
        let policy = Policy::compile(None);
        let now = Instant::now();
        let c1 = &rt.credentials[0];
        c1.state.record_outcome(
            "m",
            Outcome {
                status: 429,
                retry_after: None,
                counts: true,
            },
            &policy,
            now,
        );
        assert_eq!(names(&rt, "m", 2), ["c2", "c3"]);
        assert_eq!(names(&rt, "other", 1), ["c1"], "the ban is per model");
        let Lookup::Route(route) = rt.lookup("m") else {
            panic!()
        };
        let pick = select(
            Query {
                rt: &rt,
                route,
                model_id: "m",
                cursor: &rt.cursor("m"),
                tried: &[1, 2],
                remote: &RemoteHealth::default(),
            },
            &LocalLimits::WHOLE,
            now,
        )
        .unwrap();
        assert_eq!(pick.tier, Tier::Fallback);
    }

    #[test]
    fn proxies_whose_remote_refuses_the_model_are_skipped() {
        let rt = runtime(THREE);
        let remote = RemoteHealth::default();
        let refusing = RemoteStatus {
            reachable: true,
            credentials_available: Some(0),
            ..Default::default()
        };
        remote.publish(
            [("f1".to_string(), Arc::new(refusing))]
                .into_iter()
                .collect(),
        );
        let Lookup::Route(route) = rt.lookup("m") else {
            panic!()
        };
        let pick = select(
            Query {
                rt: &rt,
                route,
                model_id: "m",
                cursor: &rt.cursor("m"),
                tried: &[0, 1, 2],
                remote: &remote,
            },
            &LocalLimits::WHOLE,
            Instant::now(),
        )
        .unwrap();
        assert_eq!(&*rt.credentials[pick.slot.cred].name, "f2");
        assert_eq!(pick.skipped.remote_refused, 1);
    }
}
