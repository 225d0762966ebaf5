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
                let missed = scanner.detectors()[d].find_from(&hay, at).filter(|(_, e)| *e <= f.start);
                proptest::prop_assert_eq!(missed, None, "{} in {:?} ({:?})", d, hay, found);
            }
            if f.start <= hay.len() {
                let own = scanner.detectors()[f.detector].find_from(&hay, f.start);
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
