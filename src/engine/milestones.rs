//! Log milestones: the request's regexes matched against each line of the new
//! container's output while it starts and is health-checked.
//!
//! Pure: [`MilestoneTracker::apply`] takes a line and says which milestones it hit.
//! A milestone with `progress >= 0` moves the phase's progress to that value (never
//! backwards); one with a negative `progress` counts its matches instead.

use crate::model::MilestoneSpec;

/// Longest output line put in an update's metadata.
const MAX_LINE_BYTES: usize = 1024;

/// One milestone matched by one line.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct MilestoneHit {
    /// Index of the milestone in the request.
    pub(crate) index: usize,
    pub(crate) description: String,
    /// Phase progress after the hit (the highest value reached so far).
    pub(crate) progress: f64,
    /// For a counting milestone: matches so far, this one included.
    pub(crate) count: Option<u64>,
    /// The matched line (cut at 1 KiB).
    pub(crate) line: String,
}

#[derive(Debug, Default)]
pub(crate) struct MilestoneTracker {
    specs: Vec<MilestoneSpec>,
    counts: Vec<u64>,
    reached: f64,
}

impl MilestoneTracker {
    pub(crate) fn new(specs: Vec<MilestoneSpec>) -> Self {
        let counts = vec![0; specs.len()];
        Self {
            specs,
            counts,
            reached: 0.0,
        }
    }

    /// Whether some milestone sets progress (then the milestones, not the clock, drive
    /// the health check's progress).
    pub(crate) fn drives_progress(&self) -> bool {
        self.specs.iter().any(|m| m.progress >= 0.0)
    }

    /// Highest progress reached so far.
    pub(crate) fn reached(&self) -> f64 {
        self.reached
    }

    /// The milestones `line` matches, in request order.
    pub(crate) fn apply(&mut self, line: &str) -> Vec<MilestoneHit> {
        let mut hits = Vec::new();
        for (index, m) in self.specs.iter().enumerate() {
            if !m.pattern.is_match(line) {
                continue;
            }
            let count = if m.progress < 0.0 {
                self.counts[index] += 1;
                Some(self.counts[index])
            } else {
                self.reached = self.reached.max(m.progress.min(1.0));
                None
            };
            hits.push(MilestoneHit {
                index,
                description: m.description.clone(),
                progress: self.reached,
                count,
                line: cut(line, MAX_LINE_BYTES).to_owned(),
            });
        }
        hits
    }
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn m(pattern: &str, progress: f64, description: &str) -> MilestoneSpec {
        MilestoneSpec {
            pattern: Regex::new(pattern).unwrap(),
            progress,
            description: description.into(),
        }
    }

    #[test]
    fn progress_moves_forward_only_and_counters_count() {
        let mut t = MilestoneTracker::new(vec![
            m("^step 1/2$", 0.5, "half"),
            m("^step 2/2$", 1.0, "done"),
            m("checkpoint", -1.0, "checkpoint"),
        ]);
        assert!(t.drives_progress());
        assert!(t.apply("unrelated").is_empty());
        let h = t.apply("step 2/2");
        assert_eq!((h[0].index, h[0].progress), (1, 1.0));
        assert_eq!(h[0].description, "done");
        assert_eq!(h[0].count, None);
        // A lower milestone after a higher one: reported, progress stays.
        let h = t.apply("step 1/2");
        assert_eq!((h[0].index, h[0].progress), (0, 1.0));
        for n in 1..=3 {
            let h = t.apply("checkpoint complete");
            assert_eq!(h.len(), 1);
            assert_eq!(h[0].count, Some(n));
            assert_eq!(h[0].line, "checkpoint complete");
            assert_eq!(h[0].progress, 1.0);
        }
    }

    #[test]
    fn one_line_can_hit_several_milestones() {
        let mut t = MilestoneTracker::new(vec![m("a", 0.2, "a"), m("b", -1.0, "b")]);
        assert!(!MilestoneTracker::new(vec![m("b", -1.0, "b")]).drives_progress());
        let h = t.apply("ab");
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].progress, 0.2);
        assert_eq!(h[1].count, Some(1));
    }

    #[test]
    fn reached_is_the_highest_progress_so_far() {
        let mut t = MilestoneTracker::new(vec![
            m("low", 0.25, "low"),
            m("high", 0.75, "high"),
            m("beyond", 7.0, "beyond"),
            m("tick", -1.0, "tick"),
        ]);
        assert_eq!(t.reached(), 0.0);
        t.apply("tick");
        assert_eq!(t.reached(), 0.0, "a counting milestone moves nothing");
        t.apply("high");
        assert_eq!(t.reached(), 0.75);
        t.apply("low");
        assert_eq!(t.reached(), 0.75, "never backwards");
        t.apply("beyond");
        assert_eq!(t.reached(), 1.0, "capped at 1");
    }

    #[test]
    fn a_milestone_at_zero_progress_sets_progress_and_does_not_count() {
        let mut t = MilestoneTracker::new(vec![m("^up$", 0.0, "up")]);
        assert!(t.drives_progress());
        let h = t.apply("up");
        assert_eq!((h[0].count, h[0].progress), (None, 0.0));
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let mut t = MilestoneTracker::new(vec![m("é", 0.1, "x")]);
        let line = "é".repeat(1000);
        let h = t.apply(&line);
        assert!(h[0].line.len() <= MAX_LINE_BYTES);
        assert!(h[0].line.chars().all(|c| c == 'é'));
    }

    #[test]
    fn a_cut_inside_a_char_steps_back_to_its_start() {
        // One ASCII byte, then two-byte chars: byte 1024 falls inside one.
        let line = format!("a{}", "é".repeat(600));
        assert!(!line.is_char_boundary(MAX_LINE_BYTES));
        // On a thread, so a cut that never finds a boundary fails here instead of
        // hanging the suite.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(cut(&line, MAX_LINE_BYTES).to_owned());
        });
        let cut = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("cut returns within 10 s (it steps back to a char boundary)");
        assert_eq!(cut.len(), MAX_LINE_BYTES - 1);
        assert_eq!(cut, format!("a{}", "é".repeat(511)));
    }
}
