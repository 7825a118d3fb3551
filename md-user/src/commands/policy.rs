use std::process::ExitCode;

use anyhow::{bail, Result};
use serde_json::json;

use super::{reconcile, Ctx};
use crate::{
    cli::PolicyCmd,
    netlink::Netlink,
    policy::{self, Verdict},
    state::State,
};

pub async fn policy(ctx: &Ctx, cmd: PolicyCmd) -> Result<ExitCode> {
    let nl = Netlink::connect()?;
    let mut locked = ctx.state_dir.lock()?;
    reconcile(ctx, &nl, &mut locked.state).await;
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
        PolicyCmd::List { json } => {
            list(ctx, state, json)?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    state.prune_identities();
    locked.save()?;
    Ok(ExitCode::SUCCESS)
}

fn set(
    ctx: &Ctx,
    state: &mut State,
    from: &str,
    to: &str,
    both: bool,
    verdict: Verdict,
) -> Result<()> {
    if from == to {
        bail!("a container always reaches itself; {from} → {to} needs no rule");
    }
    // Rules name containers, not addresses: a rule for a container that does not run yet is
    // kept and applies when it starts (with a warning, in case of a typo).
    for n in [from, to] {
        match state.containers.get(n) {
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
    let pairs: &[(&str, &str)] = if both {
        &[(from, to), (to, from)]
    } else {
        &[(from, to)]
    };
    for (a, b) in pairs {
        state.policy.set(a, b, verdict);
        let rule = state
            .policy
            .rules
            .iter()
            .find(|r| r.from == *a && r.to == *b)
            .cloned()
            .expect("just set");
        policy::install(&ctx.dp, state, &rule)?;
    }
    Ok(())
}

fn list(ctx: &Ctx, state: &State, as_json: bool) -> Result<()> {
    let rules: Vec<_> = state
        .policy
        .rules
        .iter()
        .map(|r| {
            json!({
                "from": r.from,
                "to": r.to,
                "verdict": r.verdict.to_string(),
                "drops": policy::drops(&ctx.dp, state, r),
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
