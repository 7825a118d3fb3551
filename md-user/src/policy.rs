//! Inter-container policy: rules between container names, kept in the state and mirrored into
//! the POLICY map keyed by identities (stable per name, so rules follow a container across
//! restarts and address changes).

use std::fmt;

use anyhow::{Context, Result};
use md_common::{PolicyKey, PolicyRule, POLICY_ALLOW, POLICY_DENY};
use serde::{Deserialize, Serialize};

use crate::{datapath::Datapath, state::State};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Allow,
    Deny,
}

impl Verdict {
    pub fn map_value(self) -> u8 {
        match self {
            Verdict::Allow => POLICY_ALLOW,
            Verdict::Deny => POLICY_DENY,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub from: String,
    pub to: String,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyState {
    /// Verdict for container pairs without a rule (deny = Docker's --icc=false).
    pub default: Verdict,
    pub rules: Vec<Rule>,
}

impl PolicyState {
    /// Sets many rules (later ones win) in one pass; returns the indices in `self.rules` of
    /// those that changed.
    pub fn set_all(&mut self, rules: &[Rule]) -> Vec<usize> {
        let mut index: std::collections::HashMap<(String, String), usize> = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.from.clone(), r.to.clone()), i))
            .collect();
        let mut changed = std::collections::BTreeSet::new();
        for r in rules {
            match index.get(&(r.from.clone(), r.to.clone())) {
                Some(&i) if self.rules[i].verdict == r.verdict => {}
                Some(&i) => {
                    self.rules[i].verdict = r.verdict;
                    changed.insert(i);
                }
                None => {
                    index.insert((r.from.clone(), r.to.clone()), self.rules.len());
                    changed.insert(self.rules.len());
                    self.rules.push(r.clone());
                }
            }
        }
        changed.into_iter().collect()
    }
}

/// Writes one rule into the POLICY map (identities are assigned on first use).
pub fn install(dp: &Datapath, state: &mut State, rule: &Rule) -> Result<()> {
    let key = PolicyKey {
        src_identity: state.identity_for(&rule.from),
        dst_identity: state.identity_for(&rule.to),
    };
    if !dp.is_loaded() {
        // Written when the datapath is loaded (see `sync`).
        return Ok(());
    }
    let mut map = dp.policy()?;
    let drops = map.get(&key, 0).map(|r| r.drops).unwrap_or(0);
    map.insert(
        key,
        PolicyRule {
            verdict: rule.verdict.map_value(),
            _pad: [0; 7],
            drops,
        },
        0,
    )
    .context("writing POLICY")?;
    Ok(())
}

/// Sets `rules` (later ones win), all or nothing: if writing POLICY fails midway (the map is
/// full), the entries written so far get their old values back and the rules and identities
/// in `state` are as they were, so no identity handed out here reaches a later container with
/// rules attached to it.
pub fn set_all(dp: &Datapath, state: &mut State, rules: &[Rule]) -> Result<()> {
    let before = (
        state.policy.clone(),
        state.identities.clone(),
        state.next_identity,
    );
    let changed = state.policy.set_all(rules);
    let written = write_rules(dp, state, &changed);
    if written.is_err() {
        (state.policy, state.identities, state.next_identity) = before;
    }
    written
}

/// Writes the rules at `indices` of `state.policy.rules` into POLICY; on an error, undoes the
/// writes it made.
fn write_rules(dp: &Datapath, state: &mut State, indices: &[usize]) -> Result<()> {
    let keys: Vec<(PolicyKey, u8)> = indices
        .iter()
        .map(|&i| {
            let r = state.policy.rules[i].clone();
            let key = PolicyKey {
                src_identity: state.identity_for(&r.from),
                dst_identity: state.identity_for(&r.to),
            };
            (key, r.verdict.map_value())
        })
        .collect();
    if !dp.is_loaded() {
        // Written when the datapath is loaded (see `sync`).
        return Ok(());
    }
    let mut map = dp.policy()?;
    let mut undo: Vec<(PolicyKey, Option<PolicyRule>)> = Vec::with_capacity(keys.len());
    for (n, (key, verdict)) in keys.iter().enumerate() {
        let old = map.get(key, 0).ok();
        let rule = PolicyRule {
            verdict: *verdict,
            _pad: [0; 7],
            drops: old.map(|r| r.drops).unwrap_or(0),
        };
        if let Err(e) = map.insert(*key, rule, 0) {
            for (key, old) in undo.iter().rev() {
                let _ = match old {
                    Some(v) => map.insert(*key, *v, 0),
                    None => map.remove(key),
                };
            }
            let full = matches!(&e, aya::maps::MapError::SyscallError(s)
                if s.io_error.raw_os_error() == Some(libc::E2BIG));
            if full {
                anyhow::bail!(
                    "the POLICY map is full ({} entries) after {n} of {} new rules; none was applied",
                    md_common::maps::POLICY_MAX,
                    keys.len()
                );
            }
            return Err(e).context("writing POLICY; none of the rules was applied");
        }
        undo.push((*key, old));
    }
    Ok(())
}

/// Writes every rule and the default verdict (after the datapath was loaded afresh).
pub fn sync(dp: &Datapath, state: &mut State) -> Result<()> {
    let rules = state.policy.rules.clone();
    for r in &rules {
        install(dp, state, r)?;
    }
    let mut cfg = dp.config()?;
    cfg.policy_default = state.policy.default.map_value();
    dp.set_config(&cfg)
}

/// Drop counters per rule, read from the map.
pub fn drops(dp: &Datapath, state: &State, rule: &Rule) -> u64 {
    let (Some(s), Some(d)) = (
        state.identities.get(&rule.from),
        state.identities.get(&rule.to),
    ) else {
        return 0;
    };
    dp.policy()
        .ok()
        .and_then(|m| {
            m.get(
                &PolicyKey {
                    src_identity: *s,
                    dst_identity: *d,
                },
                0,
            )
            .ok()
        })
        .map(|r| r.drops)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_all_reports_what_changed() {
        let rule = |f: &str, t: &str, v| Rule {
            from: f.into(),
            to: t.into(),
            verdict: v,
        };
        let mut p = PolicyState::default();
        let first = [rule("a", "b", Verdict::Deny), rule("b", "a", Verdict::Deny)];
        assert_eq!(p.set_all(&first), [0, 1]);
        assert!(p.set_all(&first).is_empty(), "nothing changes twice");
        let changed = p.set_all(&[
            rule("a", "b", Verdict::Deny),
            rule("b", "a", Verdict::Allow),
            rule("c", "a", Verdict::Deny),
            rule("c", "a", Verdict::Allow),
        ]);
        assert_eq!(changed, [1, 2]);
        assert_eq!(p.rules.len(), 3);
        assert_eq!(p.rules[1].verdict, Verdict::Allow);
        assert_eq!(p.rules[2], rule("c", "a", Verdict::Allow));
    }

    #[test]
    fn set_all_without_a_datapath_only_touches_the_state() {
        let dp = Datapath::new(std::path::Path::new("/nonexistent/md-pins"));
        let mut s = State::default();
        let r = Rule {
            from: "a".into(),
            to: "b".into(),
            verdict: Verdict::Deny,
        };
        set_all(&dp, &mut s, &[r]).unwrap();
        assert_eq!(s.policy.rules.len(), 1);
        assert_eq!(s.identities.len(), 2);
    }

    #[test]
    fn identities_follow_names() {
        let mut s = State::default();
        let a = s.identity_for("a");
        let c = s.identity_for("c");
        assert_ne!(a, c);
        assert_eq!(s.identity_for("a"), a);
    }

    #[test]
    fn verdicts_map_to_the_datapath_values() {
        assert_eq!(Verdict::Allow.map_value(), POLICY_ALLOW);
        assert_eq!(Verdict::Deny.map_value(), POLICY_DENY);
        assert_eq!(Verdict::Allow.to_string(), "allow");
        assert_eq!(Verdict::Deny.to_string(), "deny");
        assert_eq!(Verdict::default(), Verdict::Allow);
    }

    /// Without a loaded datapath, rules only get identities (written when it loads) and a
    /// sync fails (the default verdict lives in CONFIG).
    #[test]
    fn rules_without_a_datapath() {
        let dp = Datapath::new(std::path::Path::new("/nonexistent/md-policy-test"));
        let mut s = State::default();
        let rule = Rule {
            from: "web".into(),
            to: "db".into(),
            verdict: Verdict::Deny,
        };
        assert_eq!(drops(&dp, &s, &rule), 0, "no identities yet");
        install(&dp, &mut s, &rule).unwrap();
        assert_eq!(s.identities.get("web"), Some(&1));
        assert_eq!(s.identities.get("db"), Some(&2));
        assert_eq!(drops(&dp, &s, &rule), 0, "no map to read");
        s.policy.rules.push(Rule {
            from: "cache".into(),
            to: "db".into(),
            verdict: Verdict::Allow,
        });
        assert!(sync(&dp, &mut s).is_err());
        assert_eq!(s.identities.get("cache"), Some(&3));
    }
}
