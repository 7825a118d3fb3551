use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{reconcile, run::validate_name, Ctx};
use crate::{
    cli::PolicyCmd,
    netlink::Netlink,
    policy::{self, Rule, Verdict},
    state::State,
};

pub async fn policy(ctx: &Ctx, cmd: PolicyCmd) -> Result<ExitCode> {
    crate::timing::mark("start");
    let nl = Netlink::connect()?;
    let mut locked = ctx.state_dir.lock()?;
    crate::timing::mark("locked");
    reconcile(ctx, &nl, &mut locked.state).await;
    crate::timing::mark("reconciled");
    let state = &mut locked.state;
    match cmd {
        PolicyCmd::Deny { from, to, both } => set(ctx, state, &from, &to, both, Verdict::Deny)?,
        PolicyCmd::Allow { from, to, both } => set(ctx, state, &from, &to, both, Verdict::Allow)?,
        PolicyCmd::Default { verdict } => {
            state.policy.default = if verdict == "deny" {
                Verdict::Deny
            } else {
                Verdict::Allow
            };
            if ctx.dp.is_loaded() {
                let mut cfg = ctx.dp.config()?;
                cfg.policy_default = state.policy.default.map_value();
                ctx.dp.set_config(&cfg)?;
            }
        }
        PolicyCmd::Import { file } => {
            let text = if file.as_os_str() == "-" {
                let mut t = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)?;
                t
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let rules = parse_rules(&text)?;
            for (_, from, to, _) in &rules {
                check_pair(from, to)?;
            }
            let mut absent = std::collections::BTreeSet::new();
            let mut all = Vec::new();
            for (verdict, from, to, both) in &rules {
                for n in [from, to] {
                    if !state.containers.contains_key(n.as_str())
                        && !state.remote.contains_key(n.as_str())
                    {
                        absent.insert(n.clone());
                    }
                }
                all.extend(pair(from, to, *both, *verdict));
            }
            // All or nothing: a map that fills up midway leaves no rule and no identity.
            policy::set_all(&ctx.dp, state, &all)?;
            if !absent.is_empty() {
                eprintln!(
                    "md-user: warning: {} named containers are not running; their rules apply once they run",
                    absent.len()
                );
            }
            println!("{} rules applied", rules.len());
        }
        PolicyCmd::List { json } => {
            list(ctx, state, json)?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    crate::timing::mark("set");
    locked.save()?;
    crate::timing::mark("saved");
    Ok(ExitCode::SUCCESS)
}

/// `deny|allow FROM TO [--both]` lines.
fn parse_rules(text: &str) -> Result<Vec<(Verdict, String, String, bool)>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let (verdict, rest) = match words.split_first() {
            Some((&"deny", rest)) => (Verdict::Deny, rest),
            Some((&"allow", rest)) => (Verdict::Allow, rest),
            _ => bail!(
                "line {}: expected `deny|allow FROM TO [--both]`: {line:?}",
                n + 1
            ),
        };
        match rest {
            [from, to] => out.push((verdict, from.to_string(), to.to_string(), false)),
            [from, to, "--both"] => out.push((verdict, from.to_string(), to.to_string(), true)),
            _ => bail!(
                "line {}: expected `deny|allow FROM TO [--both]`: {line:?}",
                n + 1
            ),
        }
    }
    Ok(out)
}

fn check_pair(from: &str, to: &str) -> Result<()> {
    validate_name(from)?;
    validate_name(to)?;
    if from == to {
        bail!("a container always reaches itself; {from} → {to} needs no rule");
    }
    Ok(())
}

fn set(
    ctx: &Ctx,
    state: &mut State,
    from: &str,
    to: &str,
    both: bool,
    verdict: Verdict,
) -> Result<()> {
    check_pair(from, to)?;
    // Rules name containers, not addresses: a rule for a container that does not run yet is
    // kept and applies when it starts (with a warning, in case of a typo).
    for n in [from, to] {
        match state.containers.get(n) {
            // A container on another host of an overlay network (issue 17).
            None if state.remote.contains_key(n) => {}
            None => eprintln!(
                "md-user: warning: no container named {n} is running; the rule applies once it runs"
            ),
            // Its traffic carries another's address (or the host's): rules cannot tell it apart.
            Some(c) if c.interfaces.is_empty() => eprintln!(
                "md-user: warning: {n} runs with --network {}; policy applies to containers with their own interface",
                c.mode
            ),
            Some(_) => {}
        }
    }
    policy::set_all(&ctx.dp, state, &pair(from, to, both, verdict))
}

/// The rules one `deny|allow FROM TO [--both]` stands for.
fn pair(from: &str, to: &str, both: bool, verdict: Verdict) -> Vec<Rule> {
    let rule = |from: &str, to: &str| Rule {
        from: from.to_string(),
        to: to.to_string(),
        verdict,
    };
    if both {
        vec![rule(from, to), rule(to, from)]
    } else {
        vec![rule(from, to)]
    }
}

fn list(ctx: &Ctx, state: &State, as_json: bool) -> Result<()> {
    let identities = state.identities()?;
    let rules: Vec<_> = state
        .rules()?
        .iter()
        .map(|r| {
            json!({
                "from": r.from,
                "to": r.to,
                "verdict": r.verdict.to_string(),
                "drops": policy::drops(&ctx.dp, &identities, r),
            })
        })
        .collect();
    if as_json {
        let out = json!({"default": state.policy.default.to_string(), "rules": rules});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("default: {}", state.policy.default);
    println!("{:<8} {:<24} {:<24} DROPS", "VERDICT", "FROM", "TO");
    for r in rules {
        println!(
            "{:<8} {:<24} {:<24} {}",
            r["verdict"].as_str().unwrap_or(""),
            r["from"].as_str().unwrap_or(""),
            r["to"].as_str().unwrap_or(""),
            r["drops"]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_files() {
        let r = parse_rules("# comment\ndeny a c\n\nallow b c --both # trailing\n").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (Verdict::Deny, "a".into(), "c".into(), false));
        assert_eq!(r[1], (Verdict::Allow, "b".into(), "c".into(), true));
        assert!(parse_rules("block a c").is_err());
        assert!(parse_rules("deny a").is_err());
        assert!(parse_rules("deny a b c").is_err());
    }
}
