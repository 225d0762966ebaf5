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

use regex::{Regex, RegexBuilder};

mod scan;

pub(crate) use scan::{Found, Scanner, Wanted};

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

/// `[redacted:<name>]`.
pub(crate) fn marker(name: &str) -> String {
    format!("[redacted:{name}]")
}

#[cfg(test)]
mod tests;
