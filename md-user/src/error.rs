//! md-user has one error type, `anyhow::Error` with context; users see it on one line.

/// Formats an error chain as one line: "context: cause: root cause".
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        // Context layers often repeat their cause verbatim; keep the line short.
        if parts.last().is_some_and(|p| p.contains(&s)) {
            continue;
        }
        parts.push(s);
    }
    parts.join(": ").replace('\n', " ")
}

/// Fails with one clear line unless we can do what md does (root, or CAP_NET_ADMIN + CAP_BPF +
/// CAP_SYS_ADMIN for namespaces and bpffs).
pub fn require_privileges() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let missing: Vec<&str> = [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
        (CAP_BPF, "CAP_BPF"),
    ]
    .iter()
    .filter(|(bit, _)| eff & (1u64 << bit) == 0)
    .map(|(_, n)| *n)
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "root privileges needed (missing {}); run it with sudo",
            missing.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn one_line_joins_chain_without_repeats() {
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("file not found"));
        let e = e.context("reading state").unwrap_err();
        assert_eq!(one_line(&e), "reading state: file not found");
    }
}
