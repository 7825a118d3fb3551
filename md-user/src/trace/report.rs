//! `trace`'s output for people (`--json` prints the [`Report`] itself).

use std::fmt::Write;

use super::{
    walk::{End, Hop, Leg},
    Report,
};

fn leg(out: &mut String, title: &str, l: &Leg) {
    let _ = writeln!(out, "\n{title}");
    for b in &l.before {
        let _ = writeln!(out, "   {b}");
    }
    for h in &l.hops {
        hop(out, h);
    }
    let _ = match &l.end {
        End::Delivered { to, packet, .. } => writeln!(
            out,
            "=> delivered to {to}: {} > {}  {}",
            packet.src, packet.dst, packet.what
        ),
        End::Dropped {
            reason, at, detail, ..
        } => writeln!(out, "=> DROPPED by {at}: {reason}: {detail}"),
        End::Lost { why } => writeln!(out, "=> lost: {why}"),
    };
}

fn hop(out: &mut String, h: &Hop) {
    let ran = h
        .ran_as
        .as_ref()
        .map(|r| format!(" (run as {r}: BPF_PROG_TEST_RUN frames packets as Ethernet)"))
        .unwrap_or_default();
    let _ = writeln!(out, "{:>2} {}{ran}", h.n, h.program);
    let _ = writeln!(out, "   at       {}", h.role);
    let _ = writeln!(out, "   in       {}", h.packet_in.line());
    for l in &h.lookups {
        let _ = writeln!(out, "   {:<8} {}: {}", short(&l.map), l.key, l.value);
    }
    let reason = h
        .drop_reason
        .as_ref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "   verdict  {} (return code {}){reason}",
        h.verdict, h.return_code
    );
    if !h.counters.is_empty() {
        let c: Vec<String> = h
            .counters
            .iter()
            .map(|c| format!("{} {} +{}", c.interface, c.counter, c.delta))
            .collect();
        let _ = writeln!(out, "   counted  {}", c.join(", "));
    }
    for c in &h.changes {
        let _ = writeln!(out, "   changed  {c}");
    }
    for e in &h.events {
        let _ = writeln!(out, "   event    {e}");
    }
    if h.rewritten.is_empty() {
        let _ = writeln!(out, "   out      unchanged");
    } else {
        let _ = writeln!(out, "   out      {}", h.packet_out.line());
        for r in &h.rewritten {
            let _ = writeln!(out, "            rewritten: {r}");
        }
        if !h.packet_out.checksums_ok {
            let _ = writeln!(out, "            CHECKSUMS WRONG after the rewrite");
        }
    }
    for t in &h.then {
        let _ = writeln!(out, "   then     {t}");
    }
}

/// Map names shortened to fit the column.
fn short(map: &str) -> &str {
    match map {
        "CONNTRACK_NEW" => "CT_NEW",
        "CONNTRACK" => "CT",
        "HOST_ADDRS" => "HOSTADDR",
        "MD_SUBNETS" => "SUBNETS",
        "ENDPOINTS" => "ENDPOINT",
        m => m,
    }
}

pub fn text(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "trace {} → {}", r.from, r.to);
    let copied: Vec<String> = r
        .sandbox
        .maps
        .iter()
        .map(|c| format!("{} {}", c.map, c.entries))
        .collect();
    let same = r.sandbox.programs.iter().all(|p| p.same_as_live);
    let _ = writeln!(
        out,
        "run on a private copy of md's datapath ({} programs{}; maps copied: {}); nothing live is changed",
        r.sandbox.programs.len(),
        if same {
            ", the same as the loaded ones"
        } else {
            ", NOT all the same as the loaded ones"
        },
        copied.join(", ")
    );
    leg(&mut out, &format!("request from {}", r.sender), &r.request);
    if let Some(a) = &r.answer {
        leg(&mut out, "answer", a);
    }
    let reason = r
        .verdict
        .reason
        .as_ref()
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "\nresult: {}{reason}: {}",
        r.verdict.result, r.verdict.summary
    );
    for w in &r.verdict.warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    out
}
