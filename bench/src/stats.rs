//! The benchmark's statistics, pure: medians and quartiles over
//! repetitions, a distribution-free confidence interval of the median, the
//! verdict of a target (met, MISSED or inconclusive) and how a cost is
//! written. Nothing here measures; the report calls these on what it
//! measured, and the unit tests call them on known samples.
//!
//! The interval is the classic order-statistic interval of the median
//! (as in e.g. Conover, "Practical Nonparametric Statistics"): for n
//! independent repetitions, the number of them below the true median is
//! Binomial(n, 1/2), so [x_(k), x_(n+1-k)] of the sorted sample covers the
//! median with probability 1 - 2 P(B <= k-1). It assumes nothing about the
//! shape of the noise (which on a shared VM is anything but normal), and it
//! needs no resampling, so a verdict is reproducible from the figures. It is
//! a few lines, so no statistics crate is pulled in for it.

/// The confidence of every interval in the report.
pub const CONFIDENCE: f64 = 0.95;

/// P(B <= j) for B ~ Binomial(n, 1/2), computed in log space so that large
/// n do not underflow.
pub fn binomial_half_cdf(n: usize, j: usize) -> f64 {
    if j >= n {
        return 1.0;
    }
    let ln_half_n = n as f64 * std::f64::consts::LN_2;
    let mut ln_choose = 0.0_f64; // ln C(n, 0)
    let mut sum = (-ln_half_n).exp();
    for i in 1..=j {
        ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        sum += (ln_choose - ln_half_n).exp();
    }
    sum.min(1.0)
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    s
}

/// The q-quantile (0..=1) of a sorted, non-empty sample, interpolated
/// linearly between order statistics.
fn quantile_sorted(s: &[f64], q: f64) -> f64 {
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// The median (NaN for an empty sample).
pub fn median(v: &[f64]) -> f64 {
    let s = sorted(v);
    if s.is_empty() {
        f64::NAN
    } else {
        quantile_sorted(&s, 0.5)
    }
}

/// The order-statistic interval of the median at `confidence`, or None
/// when the sample is too small for any such interval to reach it (n < 6
/// at 95%).
pub fn median_ci(v: &[f64], confidence: f64) -> Option<(f64, f64)> {
    let s = sorted(v);
    let n = s.len();
    let tail = (1.0 - confidence) / 2.0;
    // The largest k (1-based) with P(B <= k-1) <= tail: the narrowest
    // interval that still has the coverage.
    let mut k = 0;
    while k < n / 2 && binomial_half_cdf(n, k) <= tail {
        k += 1;
    }
    (k >= 1).then(|| (s[k - 1], s[n - k]))
}

/// A sample over repetitions: its size, median, quartiles and the interval
/// of its median.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub p25: f64,
    pub p75: f64,
    pub ci: Option<(f64, f64)>,
}

impl Summary {
    pub fn of(v: &[f64]) -> Summary {
        let s = sorted(v);
        if s.is_empty() {
            return Summary {
                n: 0,
                median: f64::NAN,
                p25: f64::NAN,
                p75: f64::NAN,
                ci: None,
            };
        }
        Summary {
            n: s.len(),
            median: quantile_sorted(&s, 0.5),
            p25: quantile_sorted(&s, 0.25),
            p75: quantile_sorted(&s, 0.75),
            ci: median_ci(&s, CONFIDENCE),
        }
    }

    /// True when the interval of the median lies above 0: the cost is
    /// measured, not noise.
    pub fn above_zero(&self) -> bool {
        self.ci.is_some_and(|(lo, _)| lo > 0.0)
    }
}

/// Whether a target is met, by the interval of the median of its
/// per-repetition excess.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The whole interval is within the target.
    Met,
    /// The whole interval is beyond the target.
    Missed,
    /// The interval straddles the target, or there are too few repetitions
    /// for one: the noise is larger than the difference being judged.
    Inconclusive,
}

impl Verdict {
    /// How the Targets list writes it.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "**MISSED**",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// The verdict of "value <= limit" from `excess[i] = value_i - limit_i` of
/// each repetition i (the limit may itself be measured in the same
/// repetition, e.g. half the nftables map's cost): met when the interval
/// of the median excess is at or below 0, MISSED when it is above 0,
/// inconclusive otherwise.
pub fn verdict(excess: &[f64]) -> Verdict {
    match median_ci(excess, CONFIDENCE) {
        Some((_, hi)) if hi <= 0.0 => Verdict::Met,
        Some((lo, _)) if lo > 0.0 => Verdict::Missed,
        _ => Verdict::Inconclusive,
    }
}

/// What the report writes instead of a cost whose median is not above 0.
pub const BELOW_NOISE: &str = "below the noise (inconclusive)";

/// A cost over repetitions as "median [p25 to p75]" with `decimals`; a
/// median at or below zero (a marker measured faster than no marker, which
/// only noise can do) is never written as a cost but as
/// [`BELOW_NOISE`]. The quartiles are the spread of the per-repetition
/// differences and may dip below zero when the noise is larger than the
/// cost.
pub fn cost(v: &[f64], decimals: usize) -> String {
    let s = Summary::of(v);
    if s.n == 0 || s.median.is_nan() || s.median <= 0.0 {
        return BELOW_NOISE.into();
    }
    format!(
        "{:.d$} [{:.d$} to {:.d$}]",
        s.median,
        s.p25,
        s.p75,
        d = decimals
    )
}

/// A positive quantity that is not a difference (a rate, a time) as
/// "median [p25 to p75]".
pub fn figure(v: &[f64], decimals: usize) -> String {
    let s = Summary::of(v);
    format!(
        "{:.d$} [{:.d$} to {:.d$}]",
        s.median,
        s.p25,
        s.p75,
        d = decimals
    )
}

/// The interval of the median as "lo to hi", or why there is none.
pub fn interval(v: &[f64], decimals: usize) -> String {
    let s = Summary::of(v);
    match s.ci {
        Some((lo, hi)) => format!("{lo:.d$} to {hi:.d$}", d = decimals),
        None => format!("none (n = {})", s.n),
    }
}

/// The end-to-end loop's stopping rule: every comparison decided (met or
/// MISSED). Each comparison is given as its per-repetition excess.
pub fn all_decided<'a>(comparisons: impl IntoIterator<Item = &'a [f64]>) -> bool {
    comparisons
        .into_iter()
        .all(|excess| verdict(excess) != Verdict::Inconclusive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_cdf_matches_hand_computed_values() {
        assert!((binomial_half_cdf(6, 0) - 1.0 / 64.0).abs() < 1e-15);
        assert!((binomial_half_cdf(11, 2) - 67.0 / 2048.0).abs() < 1e-12);
        assert!((binomial_half_cdf(4, 2) - 11.0 / 16.0).abs() < 1e-12);
        assert_eq!(binomial_half_cdf(3, 3), 1.0);
        // Large n neither underflows nor exceeds 1.
        let big = binomial_half_cdf(2000, 1000);
        assert!(big > 0.5 && big < 0.52, "{big}");
    }

    #[test]
    fn median_interval_uses_the_right_order_statistics() {
        let v: Vec<f64> = (1..=5).map(f64::from).collect();
        assert_eq!(median_ci(&v, 0.95), None, "5 repetitions cannot reach 95%");
        let v: Vec<f64> = (1..=6).map(f64::from).collect();
        assert_eq!(median_ci(&v, 0.95), Some((1.0, 6.0)));
        // n = 11: P(B <= 1) = 12/2048 <= 0.025 < P(B <= 2): [x2, x10].
        let v: Vec<f64> = (1..=11).rev().map(f64::from).collect();
        assert_eq!(median_ci(&v, 0.95), Some((2.0, 10.0)));
        // n = 20: P(B <= 5) = 0.0207, P(B <= 6) = 0.0577: [x6, x15].
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(median_ci(&v, 0.95), Some((6.0, 15.0)));
        // NaNs are dropped, not sorted into the sample.
        let mut v: Vec<f64> = (1..=6).map(f64::from).collect();
        v.push(f64::NAN);
        assert_eq!(median_ci(&v, 0.95), Some((1.0, 6.0)));
    }

    #[test]
    fn summary_has_median_and_quartiles() {
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0, 5.0]);
        assert_eq!((s.n, s.median, s.p25, s.p75), (5, 3.0, 2.0, 4.0));
        assert_eq!(s.ci, None);
        assert_eq!(median(&[1.0, 2.0, 3.0, 10.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn verdicts_follow_the_interval() {
        // Clearly beyond the limit in every repetition: MISSED.
        let over = [40.0, 55.0, 48.0, 61.0, 39.0, 52.0, 45.0, 58.0];
        assert_eq!(verdict(&over), Verdict::Missed);
        // Clearly within it: met.
        let under: Vec<f64> = over.iter().map(|x| -x).collect();
        assert_eq!(verdict(&under), Verdict::Met);
        // Straddling 0 (the figures of issue 15's noisy run): inconclusive.
        let mixed = [-677.0, 143.0, 20.0, -30.0, 250.0, -120.0, 60.0, -5.0];
        assert_eq!(verdict(&mixed), Verdict::Inconclusive);
        // One outlier on the other side does not flip a large sample.
        let mut mostly = vec![30.0; 19];
        mostly.push(-500.0);
        assert_eq!(verdict(&mostly), Verdict::Missed);
        // Too few repetitions for any interval: inconclusive, whatever the sign.
        assert_eq!(verdict(&[100.0, 120.0, 110.0]), Verdict::Inconclusive);
        assert_eq!(verdict(&[]), Verdict::Inconclusive);
        assert_eq!(Verdict::Missed.word(), "**MISSED**");
    }

    #[test]
    fn a_negative_difference_is_never_written_as_a_cost() {
        let v = [-677.0, -20.0, 15.0, -300.0, -1.0, 40.0, -90.0];
        assert_eq!(cost(&v, 1), BELOW_NOISE);
        assert_eq!(cost(&[0.0; 6], 1), BELOW_NOISE);
        assert_eq!(cost(&[], 1), BELOW_NOISE);
        assert_eq!(
            cost(&[10.0, 20.0, 30.0, 40.0, 50.0], 1),
            "30.0 [20.0 to 40.0]"
        );
        // A positive median with a quartile below 0 is a cost, its spread
        // shown as it is.
        assert_eq!(cost(&[-10.0, 5.0, 10.0, 20.0, 30.0], 0), "10 [5 to 20]");
        assert_eq!(interval(&[1.0, 2.0], 1), "none (n = 2)");
        assert_eq!(
            interval(&(1..=6).map(f64::from).collect::<Vec<_>>(), 0),
            "1 to 6"
        );
    }

    #[test]
    fn the_loop_stops_only_when_every_comparison_is_decided() {
        let missed = [40.0, 55.0, 48.0, 61.0, 39.0, 52.0];
        let met = [-40.0, -55.0, -48.0, -61.0, -39.0, -52.0];
        let open = [-40.0, 55.0, -48.0, 61.0, 39.0, -52.0];
        assert!(all_decided([&missed[..], &met[..]]));
        assert!(!all_decided([&missed[..], &open[..]]));
        assert!(all_decided(std::iter::empty::<&[f64]>()));
    }
}
