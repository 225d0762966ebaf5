//! Detectors: what result rules look for in the text a tool returns.
//!
//! Every detector of a policy is compiled into one multi-pattern automaton, so a string is read once
//! to learn which detectors occur in it (the common answer: none); only those detectors
//! then look for their matches, together: one more read (see [`Scanner::find`]). The `regex` crate runs in time linear in the text (no
//! backtracking), whatever the pattern. Some detectors confirm a candidate with a check a
//! regular expression cannot make (a card number's Luhn digit, an SSN's valid area).
//!
//! Matches of several detectors may overlap; the one starting first wins, then the
//! longest, then the detector listed first: the output is the same whatever the order
//! the detectors were written in, and each detector looks again after a winner's end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use regex::{Regex, RegexBuilder};
use regex_automata::{Anchored, Input, PatternID, meta};

/// An ASCII word boundary: lets the lazy DFA run on any text (a Unicode `\b` makes it
/// give up at the first non-ASCII byte).
macro_rules! b {
    () => {
        r"(?-u:\b)"
    };
}

/// The built-in detectors: name, pattern, confirmation.
const BUILT_INS: &[(&str, &str, Check)] = &[
    (
        "aws_access_key",
        concat!(
            b!(),
            "(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}",
            b!()
        ),
        Check::None,
    ),
    (
        // A PEM block, whole: its body (base64, blank lines, `Proc-Type:`/`DEK-Info:`
        // headers, `\n` escapes) and its END line; cut off, as far as the body goes. The
        // body cannot run into `-----`, so a search never reads past a block's end looking
        // for an END line (which would make many BEGIN lines without one quadratic).
        "private_key",
        concat!(
            "-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----",
            r"(?:[A-Za-z0-9+/=\s:,\\.]|-[A-Za-z0-9])*",
            "(?:-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----)?"
        ),
        Check::None,
    ),
    (
        "jwt",
        concat!(
            b!(),
            r"eyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"
        ),
        Check::None,
    ),
    (
        "github_token",
        concat!(
            "(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{82,255})",
            b!()
        ),
        Check::None,
    ),
    (
        "slack_token",
        concat!(
            b!(),
            r"(?:xox[abposr]-|xoxe\.xox[bp]-|xapp-)[0-9]+-[A-Za-z0-9_-]{10,}"
        ),
        Check::None,
    ),
    (
        "us_ssn",
        concat!(b!(), "[0-9]{3}-[0-9]{2}-[0-9]{4}", b!()),
        Check::Ssn,
    ),
    (
        "credit_card",
        concat!(b!(), "[0-9](?:[ -]?[0-9]){12,18}", b!()),
        Check::Card,
    ),
    (
        "email",
        concat!(
            b!(),
            "[A-Za-z0-9][A-Za-z0-9._%+-]*@",
            "[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?",
            r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,63}",
            b!()
        ),
        Check::Email,
    ),
];

/// The names of the built-in detectors, in the order documented.
pub fn built_in_names() -> impl Iterator<Item = &'static str> {
    BUILT_INS.iter().map(|(name, _, _)| *name)
}

/// Whether `name` is a built-in detector.
pub(crate) fn is_built_in(name: &str) -> bool {
    built_in_names().any(|n| n == name)
}

/// The largest compiled program a custom pattern may make (the `regex` crate's unit):
/// enough for any identifier format, small enough that a typo like `x{1000}{1000}` is
/// refused instead of compiled.
const CUSTOM_SIZE_LIMIT: usize = 1 << 20;

/// What confirms a candidate match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Nothing: the pattern is the detector.
    None,
    /// 13 to 19 digits of a card network's range, with a valid Luhn check digit and
    /// one kind of separator.
    Card,
    /// An SSN the Social Security Administration could issue, not part of a longer
    /// dash-separated number.
    Ssn,
    /// Not a file name like `icon@2x.png`.
    Email,
}

/// One compiled detector.
#[derive(Debug)]
pub(crate) struct Detector {
    /// As written in the policy and in the `[redacted:<name>]` marker.
    pub name: String,
    regex: Regex,
    check: Check,
    /// Whether a match can take in a marker's `[` or `]`, or needs a `\B`: then a marker
    /// may uncover a match of it anywhere along, not only next to a word.
    pub crosses_markers: bool,
    /// Whether its matches are at most [`SHORT`] bytes long: looking whether it matches
    /// at a given place then reads at most that many bytes.
    short: bool,
    /// The fewest bytes a match of it has.
    shortest: usize,
}

/// The longest match of a detector said to be short (see [`Detector::short`]).
const SHORT: usize = 256;

/// Whether every match of `pattern` is at most [`SHORT`] bytes long, and the fewest bytes
/// a match has.
fn lengths(pattern: &str) -> (bool, usize) {
    let hir = regex_syntax::parse(pattern).ok();
    let properties = hir.as_ref().map(regex_syntax::hir::Hir::properties);
    (
        properties
            .and_then(|p| p.maximum_len())
            .is_some_and(|len| len <= SHORT),
        properties.and_then(|p| p.minimum_len()).unwrap_or(0),
    )
}

impl Detector {
    /// The built-in detector `name`, if there is one.
    pub(crate) fn built_in(name: &str) -> Option<Detector> {
        let (name, pattern, check) = BUILT_INS.iter().find(|(n, _, _)| *n == name)?;
        // The built-in patterns are constants, tested to compile.
        let regex = Regex::new(pattern).ok()?;
        let (short, shortest) = lengths(pattern);
        Some(Detector {
            name: (*name).to_owned(),
            regex,
            check: *check,
            crosses_markers: false,
            short,
            shortest,
        })
    }

    /// A custom detector; the error says what is wrong with the pattern.
    pub(crate) fn custom(name: &str, pattern: &str) -> Result<Detector, String> {
        let hir = regex_syntax::parse(pattern).map_err(|err| syntax_error(pattern, &err))?;
        if hir.properties().minimum_len() == Some(0) {
            return Err("it can match empty text; a detector must match at least one character (use `+` rather than `*`)".to_owned());
        }
        let regex = RegexBuilder::new(pattern)
            .size_limit(CUSTOM_SIZE_LIMIT)
            .build()
            .map_err(|err| one_line(&err.to_string()))?;
        let (short, shortest) = lengths(pattern);
        Ok(Detector {
            name: name.to_owned(),
            regex,
            check: Check::None,
            crosses_markers: crosses_markers(&hir),
            short,
            shortest,
        })
    }

    /// The pattern, as compiled.
    pub(crate) fn pattern(&self) -> &str {
        self.regex.as_str()
    }

    /// Whether the detector matches somewhere in `text` (validation only).
    pub(crate) fn is_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }

    /// The first confirmed match starting at or after `from`.
    fn find_from(&self, hay: &str, mut from: usize) -> Option<(usize, usize)> {
        // Each round starts past the previous candidate, so this ends.
        while from <= hay.len() {
            let m = self.regex.find_at(hay, from)?;
            if let Some(end) = self.confirm(hay, m.start(), m.end()) {
                return Some((m.start(), end));
            }
            from = match self.check {
                // A refused card or SSN candidate may overlap a good one starting inside
                // it; they are short (at most 37 and 11 bytes), so looking again from the
                // next character stays linear.
                Check::Card | Check::Ssn => next_char(hay, m.start()),
                // An address starting in a refused one's name has its domain too; one
                // starting in the domain (`icon@2x.png@example.org`) has another `@`.
                Check::Email => m
                    .as_str()
                    .find('@')
                    .map_or_else(|| next_char(hay, m.start()), |at| m.start() + at + 1),
                Check::None if m.end() > m.start() => m.end(),
                // Custom patterns never match empty text; stay safe if one did.
                Check::None => next_char(hay, m.end()),
            };
        }
        None
    }

    /// The end of the confirmed match the candidate `[start, end)` holds, if any: the
    /// candidate itself, or (a card number followed by more digits, `4111 1111 1111 1111
    /// 2024`) its longest prefix ending before a separator that is a card number.
    fn confirm(&self, hay: &str, start: usize, end: usize) -> Option<usize> {
        let text = hay.get(start..end)?;
        let confirmed = match self.check {
            Check::None => true,
            Check::Ssn => ssn(text) && !dash_number_around(hay, start, end),
            Check::Email => email(text),
            Check::Card => {
                return std::iter::once(text.len())
                    .chain(text.rmatch_indices([' ', '-']).map(|(at, _)| at))
                    .find(|&len| text.get(..len).is_some_and(card))
                    .map(|len| start + len);
            }
        };
        confirmed.then_some(end)
    }
}

/// The position of the character after the one at `at` (the text's end at most).
fn next_char(hay: &str, at: usize) -> usize {
    hay.get(at..)
        .and_then(|rest| rest.chars().next())
        .map_or(hay.len() + 1, |c| at + c.len_utf8())
}

/// Whether a pattern can match `[` or `]`, or uses `\B` (see [`Detector::crosses_markers`]).
fn crosses_markers(hir: &regex_syntax::hir::Hir) -> bool {
    use regex_syntax::hir::{Class, HirKind, Look};
    let bracket = |c: char| c == '[' || c == ']';
    match hir.kind() {
        HirKind::Empty => false,
        HirKind::Literal(literal) => literal.0.iter().any(|b| *b == b'[' || *b == b']'),
        HirKind::Class(Class::Unicode(class)) => class
            .ranges()
            .iter()
            .any(|r| ('['..=']').any(|c| bracket(c) && (r.start()..=r.end()).contains(&c))),
        HirKind::Class(Class::Bytes(class)) => class.ranges().iter().any(|r| {
            [b'[', b']']
                .iter()
                .any(|b| (r.start()..=r.end()).contains(b))
        }),
        HirKind::Look(look) => matches!(look, Look::WordAsciiNegate | Look::WordUnicodeNegate),
        HirKind::Repetition(repetition) => crosses_markers(&repetition.sub),
        HirKind::Capture(capture) => crosses_markers(&capture.sub),
        HirKind::Concat(subs) | HirKind::Alternation(subs) => subs.iter().any(crosses_markers),
    }
}

/// Whether the character next to a redacted match could, once a marker stands there,
/// complete a match that was not one: a word character (a `\b` appears), `-` (an SSN
/// was part of a longer dashed number) or anything not ASCII (a Unicode word).
pub(crate) fn may_uncover(neighbor: Option<char>) -> bool {
    neighbor.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || !c.is_ascii())
}

/// What is wrong with a pattern, and where (its caret picture needs several lines).
fn syntax_error(pattern: &str, err: &regex_syntax::Error) -> String {
    let (kind, offset) = match err {
        regex_syntax::Error::Parse(e) => (e.kind().to_string(), e.span().start.offset),
        regex_syntax::Error::Translate(e) => (e.kind().to_string(), e.span().start.offset),
        other => return one_line(&other.to_string()),
    };
    let at = pattern
        .get(..offset)
        .map_or(0, |before| before.chars().count())
        + 1;
    format!("{kind} (at character {at} of `{}`)", pattern.escape_debug())
}

/// A regex error's message on one line (its multi-line form points with `^`).
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join(" ")
}

/// The Luhn check of a digit string.
fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn card(text: &str) -> bool {
    let mut separator = None;
    let mut digits = Vec::with_capacity(19);
    for byte in text.bytes() {
        if byte.is_ascii_digit() {
            digits.push(byte);
        } else if *separator.get_or_insert(byte) != byte {
            return false;
        }
    }
    let prefix = |n: usize| {
        digits
            .get(..n)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| d.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let len = digits.len();
    let network = match digits.first() {
        // Visa.
        Some(b'4') => matches!(len, 13 | 16 | 19),
        // Mastercard (51-55, 2221-2720).
        Some(b'5') if (51..=55).contains(&prefix(2)) => len == 16,
        Some(b'2') if (2221..=2720).contains(&prefix(4)) => len == 16,
        // American Express.
        Some(b'3') if matches!(prefix(2), 34 | 37) => len == 15,
        // JCB.
        Some(b'3') if (3528..=3589).contains(&prefix(4)) => (16..=19).contains(&len),
        // Diners Club.
        Some(b'3') if matches!(prefix(2), 36 | 38 | 39) || (300..=305).contains(&prefix(3)) => {
            (14..=19).contains(&len)
        }
        // Discover, UnionPay, Maestro.
        Some(b'6') => (16..=19).contains(&len),
        _ => false,
    };
    network && luhn(&digits)
}

fn ssn(text: &str) -> bool {
    let &[a1, a2, a3, b'-', g1, g2, b'-', s1, s2, s3, s4] = text.as_bytes() else {
        return false;
    };
    let area = [a1, a2, a3];
    &area != b"000"
        && &area != b"666"
        && a1 != b'9'
        && [g1, g2] != *b"00"
        && [s1, s2, s3, s4] != *b"0000"
}

/// `12-345-67-8901`, `123-45-6789-01`: a longer dash-separated number, not an SSN.
fn dash_number_around(hay: &str, start: usize, end: usize) -> bool {
    let bytes = hay.as_bytes();
    let before = bytes.get(..start).unwrap_or_default();
    let after = bytes.get(end..).unwrap_or_default();
    matches!(before, [.., d, b'-'] if d.is_ascii_digit())
        || matches!(after, [b'-', d, ..] if d.is_ascii_digit())
}

/// File names that read like addresses (`icon@2x.png`).
const FILE_SUFFIXES: &[&str] = &[
    "png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "tif", "tiff", "avif",
];

fn email(text: &str) -> bool {
    let suffix = text.rsplit('.').next().unwrap_or("");
    !FILE_SUFFIXES.iter().any(|s| s.eq_ignore_ascii_case(suffix))
}

/// Every detector of a policy, and the automata that look for several at once.
#[derive(Debug)]
pub(crate) struct Scanner {
    detectors: Vec<Detector>,
    /// The detectors a call looks for, searched for together: one automaton per set of
    /// detectors met so far (a policy meets few: one per combination of its entries that
    /// apply to a call), made the first time and kept. `None`: too big together.
    together: Mutex<Kept>,
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
struct Together {
    regex: meta::Regex,
    /// The detector of each pattern, by pattern id: those that are not short first,
    /// so that where one of them matches the automaton says so (see [`Scanner::find`]).
    order: Vec<usize>,
}

/// The detectors one call looks for (see [`Scanner::wanted`]).
#[derive(Debug, Default)]
pub(crate) struct Wanted {
    /// Their indices, in order.
    pub detectors: Vec<usize>,
    together: Option<Arc<Together>>,
    /// The fewest bytes any of them matches: a shorter string (most values of a
    /// structured result: `female`, `3`, a date) needs no look.
    shortest: usize,
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
    fn find_each(&self, hay: &str, wanted: &[usize], from: usize, out: &mut Vec<Found>) {
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

/// `[redacted:<name>]`.
pub(crate) fn marker(name: &str) -> String {
    format!("[redacted:{name}]")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn scanner(names: &[&str]) -> Scanner {
        Scanner::new(
            names
                .iter()
                .map(|n| Detector::built_in(n).unwrap())
                .collect(),
        )
        .unwrap()
    }

    /// The texts each detector finds in `hay`.
    fn found(name: &str, hay: &str) -> Vec<String> {
        let scanner = scanner(&[name]);
        let mut out = Vec::new();
        scanner.find(hay, &scanner.wanted(vec![0]), &mut out);
        out.iter().map(|f| hay[f.start..f.end].to_owned()).collect()
    }

    #[test]
    fn strings_shorter_than_any_match_are_not_read() {
        let scanner = scanner(&["email", "us_ssn"]);
        let wanted = scanner.wanted(vec![0, 1]);
        assert_eq!(wanted.shortest, 6);
        let mut found = Vec::new();
        scanner.find("a@b.co", &wanted, &mut found);
        assert_eq!(found.len(), 1);
        assert_eq!(scanner.wanted(vec![1]).shortest, 11);
    }

    #[test]
    fn every_built_in_compiles() {
        for name in built_in_names() {
            assert!(Detector::built_in(name).is_some(), "{name}");
        }
        assert!(Detector::built_in("nope").is_none());
    }

    #[test]
    fn aws_access_keys() {
        assert_eq!(
            found("aws_access_key", "key=AKIAIOSFODNN7EXAMPLE, more"),
            ["AKIAIOSFODNN7EXAMPLE"]
        );
        assert_eq!(
            found("aws_access_key", "ASIAY34FZKBOKMUTVV7A"),
            ["ASIAY34FZKBOKMUTVV7A"]
        );
        // Too short, too long, lower case, a 0/1/8/9 (not base32), inside a word.
        for no in [
            "AKIAIOSFODNN7EXAMPL",
            "AKIAIOSFODNN7EXAMPLEX",
            "akiaiosfodnn7example",
            "AKIAIOSFODNN1EXAMPLE",
            "XAKIAIOSFODNN7EXAMPLE",
        ] {
            assert!(found("aws_access_key", no).is_empty(), "{no}");
        }
    }

    const PEM: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\naFDrBz9vFqU4yN2fZ0Z3VS5JJcds3xfn\n-----END RSA PRIVATE KEY-----";

    #[test]
    fn private_keys_are_found_whole() {
        let text = format!("config:\n{PEM}\nnext line");
        assert_eq!(found("private_key", &text), [PEM]);
        let openssh = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----";
        assert_eq!(found("private_key", openssh), [openssh]);
        // Two keys are two matches, not one from the first BEGIN to the last END.
        let two = format!("{PEM} and {openssh}");
        assert_eq!(found("private_key", &two), [PEM, openssh]);
        // Cut off: the body as far as it goes.
        let cut = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg+kqhkiG9w0=\n";
        assert_eq!(found("private_key", &format!("{cut}\"}}")), [cut]);
        // Encrypted (legacy OpenSSL headers).
        let encrypted = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----";
        assert_eq!(found("private_key", encrypted), [encrypted]);
        // As JSON-escaped text inside a string.
        let escaped = r"-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----";
        assert_eq!(found("private_key", escaped), [escaped]);
    }

    #[test]
    fn public_keys_and_certificates_are_not_private_keys() {
        for no in [
            "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkq\n-----END PUBLIC KEY-----",
            "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+g\n-----END CERTIFICATE-----",
            "the private key is in the vault",
        ] {
            assert!(found("private_key", no).is_empty(), "{no}");
        }
    }

    const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

    #[test]
    fn jwts() {
        assert_eq!(found("jwt", &format!("Bearer {JWT}.")), [JWT]);
        for no in [
            "eyJhbGciOiJIUzI1NiJ9",
            "eyJhbGci.notapayload.sig",
            "abc.def.ghi",
            "xeyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
        ] {
            assert!(found("jwt", no).is_empty(), "{no}");
        }
    }

    #[test]
    fn github_tokens() {
        let classic = "ghp_16C7e42F292c6912E7710c838347Ae178B4a";
        assert_eq!(
            found("github_token", &format!("GITHUB_TOKEN={classic}\n")),
            [classic]
        );
        let fine = format!("github_pat_11ABCDEFG0{}", "a1B2c3D4e5".repeat(7) + "a1");
        assert_eq!(fine.len(), 93);
        assert_eq!(found("github_token", &fine), [fine.as_str()]);
        for no in [
            "ghp_tooShort123",
            "ghx_16C7e42F292c6912E7710c838347Ae178B4a",
            "github_pat_short",
        ] {
            assert!(found("github_token", no).is_empty(), "{no}");
        }
    }

    #[test]
    fn slack_tokens() {
        let bot = "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx";
        assert_eq!(found("slack_token", &format!("token: {bot}")), [bot]);
        let app = "xapp-1-A0123456789-1234567890123-abcdef0123456789";
        assert_eq!(found("slack_token", app), [app]);
        for no in [
            "xoxb-",
            "xoxb-abcdefghijklmnop",
            "xoxz-1234-abcdefghijkl",
            "oxoxb-1-abcdefghijkl",
        ] {
            assert!(found("slack_token", no).is_empty(), "{no}");
        }
    }

    #[test]
    fn us_ssns() {
        assert_eq!(found("us_ssn", "SSN: 123-45-6789."), ["123-45-6789"]);
        assert_eq!(found("us_ssn", "(536-22-1234)"), ["536-22-1234"]);
        for no in [
            // Areas never issued, group 00, serial 0000.
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "987-65-4321",
            "123-00-4567",
            "123-45-0000",
            // Part of a longer number, or of a word.
            "1123-45-6789",
            "123-45-67890",
            "12-123-45-6789",
            "123-45-6789-12",
            "x123-45-6789",
            // Not dashed.
            "123456789",
            "123 45 6789",
        ] {
            assert!(found("us_ssn", no).is_empty(), "{no}");
        }
    }

    #[test]
    fn credit_cards_pass_their_luhn_check() {
        for yes in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "5500 0000 0000 0004",
            "2223000048400011",
            "378282246310005",
            "6011111111111117",
            "3530111333300000",
            "30569309025904",
        ] {
            assert_eq!(found("credit_card", &format!("card {yes}, exp")), [yes]);
        }
        for no in [
            // Luhn fails.
            "4111111111111112",
            "4111 1111 1111 1112",
            // Luhn holds but no card network has this range or length.
            "1234567812345670",
            "0000000000000000",
            "41111111111111119",
            // Mixed separators, part of a longer number, a timestamp.
            "4111 1111-1111 1111",
            "41111111111111112",
            "41111111111111110000",
            "1733550000000",
        ] {
            assert!(found("credit_card", no).is_empty(), "{no}");
        }
    }

    #[test]
    fn a_card_number_is_found_inside_a_longer_candidate() {
        assert_eq!(
            found("credit_card", "4111 1111 1111 1111 2024"),
            ["4111 1111 1111 1111"]
        );
        // After a refused candidate that overlaps it (`123-45-6789 4111 1111 1111 111`).
        let both = scanner(&["us_ssn", "credit_card"]);
        let hay = "123-45-6789 4111 1111 1111 1111 ";
        let mut out = Vec::new();
        both.find(hay, &both.wanted(vec![0, 1]), &mut out);
        let texts: Vec<&str> = out.iter().map(|f| &hay[f.start..f.end]).collect();
        assert_eq!(texts, ["123-45-6789", "4111 1111 1111 1111"]);
    }

    #[test]
    fn emails() {
        assert_eq!(
            found("email", "mail jane.doe+fhir@example-hospital.org."),
            ["jane.doe+fhir@example-hospital.org"]
        );
        assert_eq!(found("email", "<a@b.co>"), ["a@b.co"]);
        for no in [
            "icon@2x.png",
            "user@localhost",
            "@example.org",
            "jane@",
            "jane@example.",
            "a@b.c",
        ] {
            assert!(found("email", no).is_empty(), "{no}");
        }
    }

    #[test]
    fn custom_patterns_are_checked() {
        assert!(Detector::custom("mrn", "MRN-[0-9]{8}").is_ok());
        let err = Detector::custom("x", "MRN-[0-9").unwrap_err();
        assert!(err.contains("unclosed character class"), "{err}");
        assert!(!err.contains('\n'));
        let err = Detector::custom("x", "[0-9]*").unwrap_err();
        assert!(err.contains("empty text"), "{err}");
        assert!(Detector::custom("x", "a{1000}{1000}").is_err());
        // Backreferences and look-around (which need backtracking) do not compile.
        assert!(Detector::custom("x", r"(a)\1").is_err());
        assert!(Detector::custom("x", r"a(?=b)").is_err());
        // Which may match across a marker's edge.
        for (pattern, crosses) in [
            ("MRN-[0-9]{8}", false),
            (r"\][0-9]+", true),
            ("[^ ]+x", true),
            (r"x\B", true),
            (r"(?-u:\b)[a-z]+", false),
            ("[\\[-\\]]x", true),
        ] {
            let detector = Detector::custom("x", pattern).unwrap();
            assert_eq!(detector.crosses_markers, crosses, "{pattern}");
        }
    }

    /// A scanner of every built-in and custom detectors of both kinds (short and not).
    fn everything() -> Scanner {
        let mut detectors: Vec<Detector> = built_in_names()
            .map(|n| Detector::built_in(n).unwrap())
            .collect();
        detectors.push(Detector::custom("mrn", "MRN-[0-9]{8}").unwrap());
        detectors.push(Detector::custom("contact", "contact: [^ ]+").unwrap());
        detectors.push(Detector::custom("digits", "[0-9]{3}").unwrap());
        Scanner::new(detectors).unwrap()
    }

    #[test]
    fn the_found_detectors_are_searched_for_together_in_one_automaton() {
        let scanner = everything();
        let hay = format!(
            "ssn 123-45-6789, mail jane@example.org, {JWT} key AKIAIOSFODNN7EXAMPLE, contact: x@y.co 4111 1111 1111 1111"
        );
        let all: Vec<usize> = (0..scanner.detectors().len()).collect();
        let mut together = Vec::new();
        scanner.find(&hay, &scanner.wanted(all.clone()), &mut together);
        // One automaton, kept for the next string with the same detectors.
        let kept = scanner.together.lock().unwrap();
        let automaton = kept.get(all.as_slice()).unwrap().as_ref().unwrap();
        assert_eq!(automaton.regex.pattern_len(), all.len());
        // Those that are not short come first (see `Scanner::find`).
        let short: Vec<bool> = automaton
            .order
            .iter()
            .map(|&d| scanner.detectors()[d].short)
            .collect();
        assert!(short.is_sorted(), "{short:?}");
        drop(kept);
        let mut each = Vec::new();
        scanner.find_each(&hay, &all, 0, &mut each);
        assert_eq!(together, each);
        let texts: Vec<&str> = together.iter().map(|f| &hay[f.start..f.end]).collect();
        assert_eq!(
            texts,
            [
                "123-45-6789",
                "jane@example.org",
                JWT,
                "AKIAIOSFODNN7EXAMPLE",
                "contact: x@y.co",
                "4111 1111 1111 1111"
            ]
        );
    }

    /// Text made of pieces that make detectors meet: matches of each, of two at one
    /// start, inside another's, cut off, refused (`4111111111111112`, `000-12-3456`).
    fn pieces(refused_addresses: bool) -> impl proptest::strategy::Strategy<Value = String> {
        let mut pieces = vec![
            "123-45-6789",
            "4111 1111 1111 1111",
            "4111",
            "-",
            " ",
            "@",
            ".",
            "a",
            "Z",
            "9",
            "jane",
            "example.org",
            "MRN-12345678",
            "contact: ",
            "AKIAIOSFODNN7EXAMPLE",
            "eyJhbGciOi",
            "eyJzdWIiOi",
            "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "xoxb-1-",
            "-----BEGIN PRIVATE KEY-----",
            "é",
            "\"",
            "[redacted:email]",
            "000-12-3456",
            "123-45-6789-1",
            "4111111111111112",
            "1234",
            "eyJhbGciOi.eyJzdWIiOi.s",
            "xoxb-1-abcdefghij",
            "@example.org",
        ];
        if refused_addresses {
            pieces.push("icon@2x.png");
        }
        proptest::collection::vec(proptest::sample::select(pieces), 0..24)
            .prop_map(|parts| parts.concat())
    }

    /// Sets of detectors of [`everything`] (each makes an automaton, kept: fewer than
    /// `MAX_TOGETHER`).
    fn sets() -> impl proptest::strategy::Strategy<Value = Vec<usize>> {
        proptest::sample::select(vec![
            0b111_1111_1111u16,
            0b1_1100_0000,
            0b110,
            0b1010_1001,
            0b11_0011_0000,
            0b1000_1100,
            0b100_0110_0000,
            0b110_1000_0000,
        ])
        .prop_map(|mask| (0..11).filter(|d| mask & (1 << d) != 0).collect())
    }

    static EVERYTHING: std::sync::LazyLock<Scanner> = std::sync::LazyLock::new(everything);

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]
        /// Searching together finds exactly what each detector finds alone, merged.
        #[test]
        fn together_finds_what_each_finds(hay in pieces(true), wanted in sets()) {
            let scanner = &*EVERYTHING;
            let (mut together, mut each) = (Vec::new(), Vec::new());
            scanner.find(&hay, &scanner.wanted(wanted.clone()), &mut together);
            scanner.find_each(&hay, &wanted, 0, &mut each);
            proptest::prop_assert_eq!(together, each);
        }

        /// Every match found is one, in order, none overlapping, and none is left
        /// between them.
        #[test]
        fn together_finds_every_match(hay in pieces(true), wanted in sets()) {
            let scanner = &*EVERYTHING;
            let mut found = Vec::new();
            scanner.find(&hay, &scanner.wanted(wanted.clone()), &mut found);
            let mut at = 0;
            for f in found.iter().chain([&Found { start: hay.len() + 1, end: hay.len() + 1, detector: 0 }]) {
                proptest::prop_assert!(f.start >= at, "{found:?}");
                for &d in &wanted {
                    let missed = scanner.detectors[d].find_from(&hay, at).filter(|(_, e)| *e <= f.start);
                    proptest::prop_assert_eq!(missed, None, "{} in {:?} ({:?})", d, hay, found);
                }
                if f.start <= hay.len() {
                    let own = scanner.detectors[f.detector].find_from(&hay, f.start);
                    proptest::prop_assert_eq!(own, Some((f.start, f.end)), "{:?}", hay);
                }
                at = f.end;
            }
        }
    }

    #[test]
    fn an_address_overlapping_a_refused_one_is_found() {
        // `icon@2x.png` is a file name, `2x.png@example.org` an address.
        let scanner = &*EVERYTHING;
        let all: Vec<usize> = (0..11).collect();
        for (hay, wanted, expected) in [
            (
                "icon@2x.png@example.org",
                vec![7],
                vec!["2x.png@example.org"],
            ),
            (
                "icon@2x.png@example.org",
                all.clone(),
                vec!["2x.png@example.org"],
            ),
            (
                "-----BEGIN PRIVATE KEY-----icon@2x.png@example.org-",
                all.clone(),
                vec!["-----BEGIN PRIVATE KEY-----icon", "2x.png@example.org"],
            ),
            (
                "000-12-3456icon@2x.png@example.org",
                vec![7],
                vec!["2x.png@example.org"],
            ),
            (
                "000-12-3456icon@2x.png@example.org",
                all.clone(),
                vec!["000", "345", "2x.png@example.org"],
            ),
        ] {
            let mut out = Vec::new();
            scanner.find(hay, &scanner.wanted(wanted), &mut out);
            let texts: Vec<&str> = out.iter().map(|f| &hay[f.start..f.end]).collect();
            assert_eq!(texts, expected, "{hay}");
        }
    }

    #[test]
    fn overlapping_matches_resolve_leftmost_then_longest() {
        // `jane@example.org` (email) inside a longer custom match: the longer wins.
        let detectors = vec![
            Detector::built_in("email").unwrap(),
            Detector::custom("contact", "contact: [^ ]+").unwrap(),
        ];
        let scanner = Scanner::new(detectors).unwrap();
        let hay = "contact: jane@example.org and bob@example.org";
        let mut out = Vec::new();
        scanner.find(hay, &scanner.wanted(vec![0, 1]), &mut out);
        let texts: Vec<(&str, usize)> = out
            .iter()
            .map(|f| (&hay[f.start..f.end], f.detector))
            .collect();
        assert_eq!(
            texts,
            [("contact: jane@example.org", 1), ("bob@example.org", 0)]
        );
        // Same start, same length: the lower index wins, whatever the order asked.
        let scanner = Scanner::new(vec![
            Detector::custom("a", "[0-9]{3}").unwrap(),
            Detector::custom("b", "[0-9]+").unwrap(),
        ])
        .unwrap();
        for wanted in [[0, 1], [1, 0]] {
            let mut out = Vec::new();
            scanner.find("123", &scanner.wanted(wanted.to_vec()), &mut out);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].detector, 0);
        }
    }
}
