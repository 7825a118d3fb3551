//! Samples, medians and spreads.

use serde_json::json;

/// Nearest-rank percentile of sorted values (0 for an empty slice).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of unsorted values (mean of the middle two for an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Whether bigger is better for a unit (throughput, rates) or smaller (latency, time).
pub fn higher_is_better(unit: &str) -> bool {
    matches!(unit, "Gbit/s" | "req/s" | "conn/s")
}

/// One measured value.
#[derive(Clone, Debug)]
pub struct Sample {
    pub datapath: String,
    pub scenario: String,
    pub metric: String,
    pub value: f64,
    pub unit: String,
    pub rep: usize,
}

impl Sample {
    pub fn json_line(&self) -> String {
        json!({
            "datapath": self.datapath,
            "scenario": self.scenario,
            "metric": self.metric,
            "value": self.value,
            "unit": self.unit,
            "rep": self.rep,
        })
        .to_string()
    }
}

/// Median and spread of the samples of one (datapath, scenario, metric).
#[derive(Clone, Debug)]
pub struct Summary {
    pub datapath: String,
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    pub fn json_line(&self) -> String {
        json!({
            "datapath": self.datapath,
            "scenario": self.scenario,
            "metric": self.metric,
            "value": self.median,
            "unit": self.unit,
            "stat": "median",
            "min": self.min,
            "max": self.max,
            "n": self.n,
        })
        .to_string()
    }
}

/// Everything measured in one run, in the order it was measured.
#[derive(Default)]
pub struct Results {
    pub samples: Vec<Sample>,
    /// Things a reader must know: fallbacks taken, failures, skipped steps.
    pub notes: Vec<String>,
    pub errors: usize,
}

impl Results {
    pub fn add(
        &mut self,
        dp: &str,
        scenario: &str,
        metric: &str,
        value: f64,
        unit: &str,
        rep: usize,
    ) {
        self.samples.push(Sample {
            datapath: dp.to_string(),
            scenario: scenario.to_string(),
            metric: metric.to_string(),
            value,
            unit: unit.to_string(),
            rep,
        });
    }

    pub fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("bench: note: {s}");
        self.notes.push(s);
    }

    pub fn error(&mut self, s: impl Into<String>) {
        self.errors += 1;
        self.note(format!("ERROR: {}", s.into()));
    }

    /// Summaries in first-measured order.
    pub fn summaries(&self) -> Vec<Summary> {
        let mut keys: Vec<(&str, &str, &str, &str)> = Vec::new();
        for s in &self.samples {
            let k = (
                s.datapath.as_str(),
                s.scenario.as_str(),
                s.metric.as_str(),
                s.unit.as_str(),
            );
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        keys.into_iter()
            .map(|(dp, sc, m, u)| {
                let v: Vec<f64> = self
                    .samples
                    .iter()
                    .filter(|s| s.datapath == dp && s.scenario == sc && s.metric == m)
                    .map(|s| s.value)
                    .collect();
                Summary {
                    datapath: dp.into(),
                    scenario: sc.into(),
                    metric: m.into(),
                    unit: u.into(),
                    median: median(&v),
                    min: v.iter().copied().fold(f64::INFINITY, f64::min),
                    max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    n: v.len(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn summaries_group_by_datapath_scenario_metric() {
        let mut r = Results::default();
        for (i, v) in [5.0, 1.0, 3.0].into_iter().enumerate() {
            r.add("md", "core", "rr", v, "req/s", i);
        }
        r.add("plain", "core", "rr", 9.0, "req/s", 0);
        let s = r.summaries();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].median, s[0].min, s[0].max, s[0].n),
            (3.0, 1.0, 5.0, 3)
        );
        assert_eq!(s[1].datapath, "plain");
        assert!(s[0].json_line().contains("\"stat\":\"median\""));
    }
}
