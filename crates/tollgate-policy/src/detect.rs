//! Detectors: what result rules look for in the text a tool returns.
//!
//! Every detector of a policy is compiled into one multi-pattern automaton, so a string is read once
//! to learn which detectors occur in it (the common answer: none); only those detectors
//! then look for their matches. The `regex` crate runs in time linear in the text (no
//! backtracking), whatever the pattern. Some detectors confirm a candidate with a check a
//! regular expression cannot make (a card number's Luhn digit, an SSN's valid area).
//!
//! Matches of several detectors may overlap; the one starting first wins, then the
//! longest, then the detector listed first: the output is the same whatever the order
//! the detectors were written in, and each detector looks again after a winner's end.

use regex::{Regex, RegexBuilder};
use regex_automata::{Input, MatchKind, PatternSet, meta};

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
}

impl Detector {
    /// The built-in detector `name`, if there is one.
    pub(crate) fn built_in(name: &str) -> Option<Detector> {
        let (name, pattern, check) = BUILT_INS.iter().find(|(n, _, _)| *n == name)?;
        // The built-in patterns are constants, tested to compile.
        let regex = Regex::new(pattern).ok()?;
        Some(Detector {
            name: (*name).to_owned(),
            regex,
            check: *check,
            crosses_markers: false,
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
        Ok(Detector {
            name: name.to_owned(),
            regex,
            check: Check::None,
            crosses_markers: crosses_markers(&hir),
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
                // Every address overlapping a refused one has its domain.
                Check::None | Check::Email if m.end() > m.start() => m.end(),
                // Custom patterns never match empty text; stay safe if one did.
                Check::None | Check::Email => next_char(hay, m.end()),
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

/// Every detector of a policy, compiled together.
#[derive(Debug)]
pub(crate) struct Scanner {
    /// All the patterns, reporting every one that matches (`MatchKind::All`).
    set: meta::Regex,
    detectors: Vec<Detector>,
    /// The fewest bytes any detector matches: a shorter string (most values of a
    /// structured result: `female`, `3`, a date) needs no look.
    shortest: usize,
}

/// One match: `[start, end)` of the text, by detector `detector`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Found {
    pub start: usize,
    pub end: usize,
    pub detector: usize,
}

impl Scanner {
    /// All of `detectors` in one set. The patterns compiled alone already, so together
    /// they fail only when the set is too big; the error says so.
    pub(crate) fn new(detectors: Vec<Detector>) -> Result<Scanner, String> {
        let patterns: Vec<&str> = detectors.iter().map(Detector::pattern).collect();
        let set = meta::Builder::new()
            .configure(
                meta::Config::new()
                    .match_kind(MatchKind::All)
                    .nfa_size_limit(Some(CUSTOM_SIZE_LIMIT * 16)),
            )
            .build_many(&patterns)
            .map_err(|err| one_line(&err.to_string()))?;
        let shortest = patterns
            .iter()
            .map(|p| {
                regex_syntax::parse(p)
                    .ok()
                    .and_then(|hir| hir.properties().minimum_len())
                    .unwrap_or(0)
            })
            .min()
            .unwrap_or(0);
        Ok(Scanner {
            set,
            detectors,
            shortest,
        })
    }

    /// The detectors, by index.
    pub(crate) fn detectors(&self) -> &[Detector] {
        &self.detectors
    }

    /// A set to pass to [`candidates`](Self::candidates), reused for every string.
    pub(crate) fn pattern_set(&self) -> PatternSet {
        PatternSet::new(self.set.pattern_len())
    }

    /// Which detectors' patterns occur in `hay`, in one pass (unconfirmed: a candidate
    /// card number may fail its check), into `found` (cleared first).
    pub(crate) fn candidates(&self, hay: &str, found: &mut PatternSet) {
        found.clear();
        if hay.len() >= self.shortest {
            self.set.which_overlapping_matches(&Input::new(hay), found);
        }
    }

    /// The confirmed matches of the detectors `wanted` in `hay`, in order, none
    /// overlapping: leftmost wins, then longest, then the lowest index. Appended to `out`.
    pub(crate) fn find(&self, hay: &str, wanted: &[usize], out: &mut Vec<Found>) {
        // The next match of each wanted detector at or after the cursor.
        let mut next: Vec<Option<(usize, usize)>> = wanted
            .iter()
            .map(|&d| self.detectors.get(d).and_then(|det| det.find_from(hay, 0)))
            .collect();
        loop {
            let mut best: Option<(usize, usize, usize)> = None;
            for (slot, found) in next.iter().enumerate() {
                let Some((start, end)) = *found else { continue };
                let better = match best {
                    None => true,
                    Some((s, e, b)) => {
                        (start, std::cmp::Reverse(end), wanted.get(slot))
                            < (s, std::cmp::Reverse(e), wanted.get(b))
                    }
                };
                if better {
                    best = Some((start, end, slot));
                }
            }
            let Some((start, end, slot)) = best else {
                return;
            };
            let Some(&detector) = wanted.get(slot) else {
                return;
            };
            out.push(Found {
                start,
                end,
                detector,
            });
            for (slot, found) in next.iter_mut().enumerate() {
                if found.is_some_and(|(s, _)| s < end) {
                    *found = wanted
                        .get(slot)
                        .and_then(|&d| self.detectors.get(d))
                        .and_then(|det| det.find_from(hay, end));
                }
            }
        }
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
        scanner.find(hay, &[0], &mut out);
        out.iter().map(|f| hay[f.start..f.end].to_owned()).collect()
    }

    #[test]
    fn strings_shorter_than_any_match_are_not_read() {
        let scanner = scanner(&["email", "us_ssn"]);
        assert_eq!(scanner.shortest, 6);
        let mut found = scanner.pattern_set();
        scanner.candidates("a@b.co", &mut found);
        assert!(found.contains(regex_automata::PatternID::must(0)));
        scanner.candidates("a@b.c", &mut found);
        assert!(found.is_empty());
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
        both.find(hay, &[0, 1], &mut out);
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
        scanner.find(hay, &[0, 1], &mut out);
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
            scanner.find("123", &wanted, &mut out);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].detector, 0);
        }
    }
}
