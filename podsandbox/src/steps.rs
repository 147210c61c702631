//! Where a call's time goes: named marks in milliseconds since it began,
//! logged once at its end (the claim of a warm VM, a container create).

use std::time::Instant;

/// Marks of one call, in the order they were reached.
pub(crate) struct Steps {
    started: Instant,
    marks: Vec<(&'static str, u128)>,
}

impl Steps {
    pub(crate) fn start() -> Self {
        Self {
            started: Instant::now(),
            marks: Vec::new(),
        }
    }

    /// `name` was reached now.
    pub(crate) fn mark(&mut self, name: &'static str) {
        self.marks.push((name, self.started.elapsed().as_millis()));
    }
}

impl std::fmt::Debug for Steps {
    /// `[("placed", 3), ("resized", 90)]`: what the logs always said.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.marks.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_kept_in_order_and_never_go_back() {
        let mut s = Steps::start();
        s.mark("a");
        s.mark("b");
        assert_eq!(s.marks.iter().map(|m| m.0).collect::<Vec<_>>(), ["a", "b"]);
        assert!(s.marks[0].1 <= s.marks[1].1);
        assert!(format!("{s:?}").starts_with("[(\"a\", "));
    }
}
