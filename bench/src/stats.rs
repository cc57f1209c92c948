//! Samples, their summaries, and the checks (ratios and targets) drawn from them.

use serde_json::{json, Value};

use crate::ids::{Id, Section};

/// Which way a number is better, so that ratios and targets read the right way round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
}

/// One measured quantity: every sample of it, in run order.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// Stable key, used by checks and in the JSON; it also names the section.
    pub id: Id,
    /// Human label for the tables.
    pub label: String,
    pub unit: &'static str,
    pub better: Better,
    pub samples: Vec<f64>,
    /// Free-form parameters (sizes, variant), kept for machines.
    pub params: Value,
}

/// Order statistics of a sample set.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub q1: f64,
    pub q3: f64,
}

/// Linear-interpolated quantile of sorted data (the "type 7" definition most tools use).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub fn summarize(samples: &[f64]) -> Summary {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    Summary {
        n: s.len(),
        median: quantile(&s, 0.5),
        min: s.first().copied().unwrap_or(f64::NAN),
        max: s.last().copied().unwrap_or(f64::NAN),
        q1: quantile(&s, 0.25),
        q3: quantile(&s, 0.75),
    }
}

impl Measurement {
    pub fn summary(&self) -> Summary {
        summarize(&self.samples)
    }
}

/// A bound a value must meet.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    AtMost(f64),
    Below(f64),
    AtLeast(f64),
}

impl Target {
    pub fn met(self, v: f64) -> bool {
        match self {
            Target::AtMost(t) => v <= t,
            Target::Below(t) => v < t,
            Target::AtLeast(t) => v >= t,
        }
    }

    /// `≥ 3×`, `< 20 ms`.
    pub fn text(self, unit: &str) -> String {
        let (op, t) = match self {
            Target::AtMost(t) => ("≤", t),
            Target::Below(t) => ("<", t),
            Target::AtLeast(t) => ("≥", t),
        };
        let sep = if unit == "×" || unit.is_empty() {
            ""
        } else {
            " "
        };
        format!("{op} {}{sep}{unit}", fmt_tick(t))
    }
}

/// A derived figure: a ratio of two medians (with the range of per-run ratios, the runs
/// being interleaved) or a single median, optionally against a target.
#[derive(Clone, Debug)]
pub struct Check {
    pub section: Section,
    pub label: String,
    pub value: f64,
    /// "×" for ratios, else the measurement's unit.
    pub unit: String,
    /// Range of the per-run ratios, when there is one.
    pub paired: Option<(f64, f64)>,
    pub target: Option<Target>,
    /// What the ratio is: `a / b` in words, for the JSON and the table.
    pub formula: String,
}

impl Check {
    pub fn pass(&self) -> Option<bool> {
        self.target.map(|t| t.met(self.value))
    }

    pub fn verdict(&self) -> &'static str {
        match self.pass() {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "",
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "section": self.section.key(),
            "label": self.label,
            "formula": self.formula,
            "value": self.value,
            "unit": self.unit,
            "paired_min": self.paired.map(|p| p.0),
            "paired_max": self.paired.map(|p| p.1),
            "target": self.target.map(|t| t.text(&self.unit)),
            "pass": self.pass(),
        })
    }
}

/// A check that could not be drawn because a measurement it needs was never added.
#[derive(Clone, Debug, PartialEq)]
pub struct Missing {
    pub section: Section,
    /// The check's label.
    pub label: String,
    /// The measurement that is not there.
    pub id: Id,
    /// Whether the check carried a target, which the report then cannot judge.
    pub targeted: bool,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] {} \"{}\" needs measurement {}, which was not taken",
            self.section,
            if self.targeted { "target" } else { "check" },
            self.label,
            self.id
        )
    }
}

/// Everything measured in one invocation.
#[derive(Default)]
pub struct Results {
    pub measurements: Vec<Measurement>,
    pub checks: Vec<Check>,
    /// Lines for the report, per section (caveats, what was left out and why).
    pub notes: Vec<(Section, String)>,
    /// Checks asked for whose measurements are not there: a section computes its checks
    /// only from what it has just measured, so each is a fault of the run, never a choice.
    pub missing: Vec<Missing>,
}

impl Results {
    pub fn add(&mut self, m: Measurement) {
        let s = m.summary();
        eprintln!(
            "bench: [{}] {}: median {} {} (min {}, max {}, n={})",
            m.id.section(),
            m.label,
            fmt_num(s.median),
            m.unit,
            fmt_num(s.min),
            fmt_num(s.max),
            s.n
        );
        self.measurements.push(m);
    }

    pub fn get(&self, id: Id) -> Option<&Measurement> {
        self.measurements.iter().find(|m| m.id == id)
    }

    pub fn note(&mut self, section: Section, text: impl Into<String>) {
        self.notes.push((section, text.into()));
    }

    /// Records that the check `label` cannot be drawn without `id`, loudly, and in the
    /// report beside the section's other notes.
    fn lost(&mut self, label: String, id: Id, target: Option<Target>) {
        let missing = Missing {
            section: id.section(),
            label,
            id,
            targeted: target.is_some(),
        };
        eprintln!("bench: {missing}");
        self.note(
            missing.section,
            format!(
                "**Not measured:** {} needs `{}`, which this run did not take.",
                missing.label, missing.id
            ),
        );
        self.missing.push(missing);
    }

    /// Adds `a / b` as a check, in the section of `a`; a missing measurement is recorded
    /// in [`Results::missing`].
    pub fn ratio(&mut self, label: impl Into<String>, a: Id, b: Id, target: Option<Target>) {
        let label = label.into();
        let (ma, mb) = match (self.get(a), self.get(b)) {
            (Some(ma), Some(mb)) => (ma, mb),
            (None, _) => return self.lost(label, a, target),
            (_, None) => return self.lost(label, b, target),
        };
        let value = ma.summary().median / mb.summary().median;
        // Runs were interleaved, so run i of each saw the same moment of the machine's noise.
        let paired = (ma.samples.len() == mb.samples.len() && !ma.samples.is_empty()).then(|| {
            let r: Vec<f64> = ma
                .samples
                .iter()
                .zip(&mb.samples)
                .map(|(x, y)| x / y)
                .collect();
            let s = summarize(&r);
            (s.min, s.max)
        });
        let check = Check {
            section: a.section(),
            label,
            value,
            unit: "×".into(),
            paired,
            target,
            formula: format!("{} / {}", ma.label, mb.label),
        };
        self.push_check(check);
    }

    /// Adds the median of `id` itself as a check against `target`, in the section of
    /// `id`; a missing measurement is recorded in [`Results::missing`].
    pub fn absolute(&mut self, label: impl Into<String>, id: Id, target: Target) {
        let label = label.into();
        let Some(m) = self.get(id) else {
            return self.lost(label, id, Some(target));
        };
        let check = Check {
            section: id.section(),
            label,
            value: m.summary().median,
            unit: m.unit.to_string(),
            paired: None,
            target: Some(target),
            formula: format!("median of {}", m.label),
        };
        self.push_check(check);
    }

    fn push_check(&mut self, c: Check) {
        eprintln!(
            "bench: [{}] {}: {}{} {}{}",
            c.section,
            c.label,
            fmt_num(c.value),
            if c.unit == "×" {
                "×".to_string()
            } else {
                format!(" {}", c.unit)
            },
            c.target.map(|t| t.text(&c.unit)).unwrap_or_default(),
            match c.pass() {
                Some(true) => " PASS",
                Some(false) => " MISS",
                None => "",
            }
        );
        self.checks.push(c);
    }
}

/// A number with about three significant digits, without exponent noise.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a == 0.0 {
        "0".into()
    } else {
        format!("{v:.3}")
    }
}

/// A round number as short as it goes: `3`, `1.1`, `0.25`, `1024`.
pub fn fmt_tick(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        let s = summarize(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(
            (s.median, s.min, s.max, s.q1, s.q3),
            (3.0, 1.0, 5.0, 2.0, 4.0)
        );
        assert_eq!(summarize(&[1.0, 2.0]).median, 1.5);
    }

    fn measured(id: Id, samples: &[f64]) -> Measurement {
        Measurement {
            id,
            label: id.to_string(),
            unit: "ms",
            better: Better::Lower,
            samples: samples.to_vec(),
            params: json!({}),
        }
    }

    #[test]
    fn checks_land_in_their_measurements_section() {
        use crate::ids::{ReadPattern, ReadVia};
        let seq = |v| Id::Read(ReadPattern::Sequential, v);
        let mut r = Results::default();
        r.add(measured(seq(ReadVia::Passthrough), &[9.0, 10.0]));
        r.add(measured(seq(ReadVia::Native), &[10.0, 10.0]));
        r.ratio(
            "seq",
            seq(ReadVia::Passthrough),
            seq(ReadVia::Native),
            Some(Target::AtLeast(0.9)),
        );
        r.absolute("native", seq(ReadVia::Native), Target::Below(20.0));
        assert!(r.missing.is_empty());
        assert_eq!(r.checks.len(), 2);
        assert!(r.checks.iter().all(|c| c.section == Section::Reads));
        assert_eq!(r.checks[0].pass(), Some(true));
        assert_eq!(r.checks[0].paired, Some((0.9, 1.0)));
    }

    #[test]
    fn a_missing_measurement_is_recorded_not_skipped() {
        use crate::ids::{FootprintPoint, Held};
        let id = Id::Footprint(Held::Rss, FootprintPoint::BigRead);
        let mut r = Results::default();
        r.absolute("RSS, big-read", id, Target::Below(64.0));
        r.ratio("untargeted", Id::ProcessStart, id, None);
        assert_eq!(
            r.missing,
            [
                Missing {
                    section: Section::Footprint,
                    label: "RSS, big-read".into(),
                    id,
                    targeted: true,
                },
                Missing {
                    section: Section::Latency,
                    label: "untargeted".into(),
                    id: Id::ProcessStart,
                    targeted: false,
                },
            ]
        );
        assert!(r.missing[0].to_string().contains("footprint/rss/big-read"));
        assert!(r.checks.is_empty());
    }
}
