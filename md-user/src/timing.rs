//! Where a command's time goes, for the bench: with `MD_TIMING=FILE`, each `mark` appends
//! "PID LABEL MICROSECONDS-SINCE-START" to FILE. Costs nothing otherwise.

use std::{io::Write, sync::OnceLock, time::Instant};

static START: OnceLock<Instant> = OnceLock::new();

/// Call early in main: the reference point of every mark.
pub fn start() {
    START.get_or_init(Instant::now);
}

pub fn mark(label: &str) {
    let Some(path) = std::env::var_os("MD_TIMING") else {
        return;
    };
    let us = START.get_or_init(Instant::now).elapsed().as_micros();
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
    {
        let _ = writeln!(f, "{} {label} {us}", std::process::id());
    }
}
