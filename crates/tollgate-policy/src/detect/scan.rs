//! Looking for a policy's detectors in a text: one automaton of the detectors a
//! call wants reads the text once, and overlapping matches are resolved (see
//! [`Scanner::find`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use regex_automata::{Anchored, Input, PatternID, meta};

use super::{CUSTOM_SIZE_LIMIT, Check, Detector, next_char, one_line};

/// Every detector of a policy, and the automata that look for several at once.
#[derive(Debug)]
pub(crate) struct Scanner {
    detectors: Vec<Detector>,
    /// The detectors a call looks for, searched for together: one automaton per set of
    /// detectors met so far (a policy meets few: one per combination of its entries that
    /// apply to a call), made the first time and kept. `None`: too big together.
    pub(super) together: Mutex<Kept>,
}

/// The automata made, by set of detectors.
type Kept = HashMap<Box<[usize]>, Option<Arc<Together>>>;

/// Where a detector was last looked for from, and its next match (start, end) there.
/// Where detector `detector` (pattern `id` of `together`, not the one the automaton
/// found) matches at `start`, if it does there: a short detector looks there (a few
/// bytes); one that is not looks for its next match onwards, kept in `next` until
/// passed (made at the first match: most strings have none).
fn end_here(
    together: &Together,
    detector: &Detector,
    id: usize,
    hay: &str,
    start: usize,
    next: &mut Vec<Next>,
) -> Option<usize> {
    if detector.short {
        let pattern = PatternID::new(id).ok()?;
        let here = Input::new(hay)
            .span(start..hay.len())
            .anchored(Anchored::Pattern(pattern));
        return together.regex.search(&here).map(|m| m.end());
    }
    if next.is_empty() {
        *next = vec![None; together.order.len()];
    }
    let slot = next.get_mut(id)?;
    let known = matches!(*slot, Some((looked, found))
        if looked <= start && found.is_none_or(|(s, _)| s >= start));
    if !known {
        let found = detector.regex.find_at(hay, start);
        *slot = Some((start, found.map(|m| (m.start(), m.end()))));
    }
    match *slot {
        Some((_, Some((s, end)))) if s == start => Some(end),
        _ => None,
    }
}

type Next = Option<(usize, Option<(usize, usize)>)>;

/// Sets of detectors kept searched for together at most; a further set is searched for
/// one detector at a time (the same matches, one read of the text per detector).
const MAX_TOGETHER: usize = 64;

/// Several detectors in one leftmost-first automaton: one read of the text finds the
/// next place where any of them matches.
#[derive(Debug)]
pub(super) struct Together {
    pub(super) regex: meta::Regex,
    /// The detector of each pattern, by pattern id: those that are not short first,
    /// so that where one of them matches the automaton says so (see [`Scanner::find`]).
    pub(super) order: Vec<usize>,
}

/// The detectors one call looks for (see [`Scanner::wanted`]).
#[derive(Debug, Default)]
pub(crate) struct Wanted {
    /// Their indices, in order.
    pub detectors: Vec<usize>,
    together: Option<Arc<Together>>,
    /// The fewest bytes any of them matches: a shorter string (most values of a
    /// structured result: `female`, `3`, a date) needs no look.
    pub(super) shortest: usize,
}

impl Wanted {
    /// Whether there is nothing to look for.
    pub(crate) fn is_empty(&self) -> bool {
        self.detectors.is_empty()
    }
}

/// One match: `[start, end)` of the text, by detector `detector`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Found {
    pub start: usize,
    pub end: usize,
    pub detector: usize,
}

impl Found {
    /// Whether this match wins over `other` at the same start: the longer, then the
    /// detector listed first.
    fn beats(&self, other: &Found) -> bool {
        (std::cmp::Reverse(self.end), self.detector)
            < (std::cmp::Reverse(other.end), other.detector)
    }
}

impl Scanner {
    /// All of `detectors`. The patterns compiled alone already, so together they fail
    /// only when the set is too big; the error says so.
    pub(crate) fn new(detectors: Vec<Detector>) -> Result<Scanner, String> {
        let scanner = Scanner {
            detectors,
            together: Mutex::default(),
        };
        // All of them together: the automaton of a policy with one entry, and the proof
        // that every set of them compiles.
        let all: Vec<usize> = (0..scanner.detectors.len()).collect();
        if all.len() > 1 {
            let together = Together::new(&scanner.detectors, &all)?;
            scanner
                .together
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(all.into(), Some(Arc::new(together)));
        }
        Ok(scanner)
    }

    /// The detectors, by index.
    pub(crate) fn detectors(&self) -> &[Detector] {
        &self.detectors
    }

    /// The detectors `detectors` of one call, with their automaton.
    pub(crate) fn wanted(&self, mut detectors: Vec<usize>) -> Wanted {
        detectors.sort_unstable();
        detectors.dedup();
        let shortest = detectors
            .iter()
            .filter_map(|&d| self.detectors.get(d))
            .map(|d| d.shortest)
            .min()
            .unwrap_or(0);
        let together = if detectors.len() > 1 {
            let mut kept = self.together.lock().unwrap_or_else(PoisonError::into_inner);
            match kept.get(detectors.as_slice()) {
                Some(together) => together.clone(),
                None if kept.len() >= MAX_TOGETHER => None,
                None => {
                    let together = Together::new(&self.detectors, &detectors)
                        .ok()
                        .map(Arc::new);
                    kept.insert(detectors.as_slice().into(), together.clone());
                    together
                }
            }
        } else {
            None
        };
        Wanted {
            detectors,
            together,
            shortest,
        }
    }

    /// The confirmed matches of the detectors `wanted` in `hay`, in order, none
    /// overlapping: leftmost wins, then longest, then the lowest index. Appended to `out`.
    ///
    /// One automaton of the wanted detectors reads the text once to find the next place
    /// where any of them matches, and the match of the first of them (in its order)
    /// that matches there. Whether the others match at that same place (one may be
    /// longer) is asked of each: a short detector looks there (a few bytes), one that
    /// is not looks for its next match onwards, which stays known until passed (they are
    /// ordered first, so this is only asked of those after the one found).
    pub(crate) fn find(&self, hay: &str, wanted: &Wanted, out: &mut Vec<Found>) {
        if hay.len() < wanted.shortest {
            return;
        }
        let Some(together) = &wanted.together else {
            return self.find_each(hay, &wanted.detectors, 0, out);
        };
        // The next match of each detector that is not short, from where it was looked for.
        let mut next: Vec<Next> = Vec::new();
        let mut at = 0;
        while at <= hay.len() {
            let input = Input::new(hay).span(at..hay.len());
            let Some(first) = together.regex.search(&input) else {
                return;
            };
            let start = first.start();
            let mut best: Option<Found> = None;
            let from = first.pattern().as_usize();
            for (id, &d) in together.order.iter().enumerate().skip(from) {
                let Some(detector) = self.detectors.get(d) else {
                    continue;
                };
                let end = if id == from {
                    Some(first.end())
                } else {
                    end_here(together, detector, id, hay, start, &mut next)
                };
                let Some(end) = end else { continue };
                match detector.confirm(hay, start, end) {
                    Some(end) if end > start => {
                        let found = Found {
                            start,
                            end,
                            detector: d,
                        };
                        if best.is_none_or(|b| found.beats(&b)) {
                            best = Some(found);
                        }
                    }
                    // A refused address is passed over whole, with every candidate
                    // inside it (see `find_from`): as each detector alone does.
                    None if detector.check == Check::Email => {
                        return self.find_each(hay, &wanted.detectors, start, out);
                    }
                    _ => {}
                }
            }
            match best {
                Some(found) => {
                    out.push(found);
                    at = found.end;
                }
                None => at = next_char(hay, start),
            }
        }
    }

    /// [`find`](Self::find) from `from`, each detector reading the text itself.
    pub(super) fn find_each(&self, hay: &str, wanted: &[usize], from: usize, out: &mut Vec<Found>) {
        // The next match of each wanted detector at or after the cursor.
        let mut next: Vec<Option<(usize, usize)>> = wanted
            .iter()
            .map(|&d| {
                self.detectors
                    .get(d)
                    .and_then(|det| det.find_from(hay, from))
            })
            .collect();
        loop {
            let mut best: Option<Found> = None;
            for (slot, found) in next.iter().enumerate() {
                let (Some((start, end)), Some(&detector)) = (*found, wanted.get(slot)) else {
                    continue;
                };
                let found = Found {
                    start,
                    end,
                    detector,
                };
                if best.is_none_or(|b| start < b.start || (start == b.start && found.beats(&b))) {
                    best = Some(found);
                }
            }
            let Some(best) = best else {
                return;
            };
            out.push(best);
            for (slot, found) in next.iter_mut().enumerate() {
                if found.is_some_and(|(s, _)| s < best.end) {
                    *found = wanted
                        .get(slot)
                        .and_then(|&d| self.detectors.get(d))
                        .and_then(|det| det.find_from(hay, best.end));
                }
            }
        }
    }
}

impl Together {
    /// The automaton of `wanted` (of `detectors`), those that are not short first.
    fn new(detectors: &[Detector], wanted: &[usize]) -> Result<Together, String> {
        let mut order: Vec<usize> = wanted
            .iter()
            .copied()
            .filter(|&d| d < detectors.len())
            .collect();
        order.sort_by_key(|&d| detectors.get(d).is_some_and(|det| det.short));
        let patterns: Vec<&str> = order
            .iter()
            .filter_map(|&d| detectors.get(d))
            .map(Detector::pattern)
            .collect();
        let regex = meta::Builder::new()
            .configure(meta::Config::new().nfa_size_limit(Some(CUSTOM_SIZE_LIMIT * 16)))
            .build_many(&patterns)
            .map_err(|err| one_line(&err.to_string()))?;
        Ok(Together { regex, order })
    }
}
