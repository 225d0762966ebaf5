//! Logging on stderr: `RUST_LOG` filtering, and the text format's escaping of what
//! clients and upstreams sent.

/// How logs are written.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sets up `tracing` on stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: files and log collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        // Field values and messages carry what clients and upstreams sent (tool names,
        // reasons, stderr lines): escaped, so none can start a forged line or drive the
        // terminal. JSON already escapes every string.
        LogFormat::Text => builder.fmt_fields(escaping_fields()).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The text format's field formatter: `message` first as it is, then `name=value`,
/// each with control, bidi and invisible characters escaped ([`escape_log_text`]).
fn escaping_fields() -> EscapingFields {
    EscapingFields
}

/// See [`escaping_fields`]. Every span and event of every call passes here, so values
/// are escaped as they are written (no string per field), and a plain string is
/// written between its quotes without the `Debug` machinery.
struct EscapingFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for EscapingFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

impl EscapingVisitor<'_> {
    fn field(
        &mut self,
        field: &tracing::field::Field,
        value: impl FnOnce(&mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result,
    ) {
        if self.result.is_err() {
            return;
        }
        let writer = &mut self.writer;
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                writer.write_char(' ')?;
            }
            if field.name() != "message" {
                let name = field.name();
                writer.write_str(name.strip_prefix("r#").unwrap_or(name))?;
                writer.write_char('=')?;
            }
            value(writer)
        })();
    }
}

impl tracing::field::Visit for EscapingVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        // What `Debug` would print, without it, when nothing needs escaping.
        if every_byte(value, |b| {
            (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
        }) {
            self.field(field, |w| {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            });
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.field(field, |w| {
            std::fmt::Write::write_fmt(&mut Escaping(w), format_args!("{value:?}"))
        });
    }
}

/// Writes through [`escape_log_text`].
struct Escaping<'a, W: std::fmt::Write>(&'a mut W);

impl<W: std::fmt::Write> std::fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.0.write_str(&escape_log_text(text))
    }
}

/// Whether every byte of `text` is `plain`. Each is looked at (no early exit), which
/// the compiler does many at a time: log fields are short and almost always plain.
fn every_byte(text: &str, plain: impl Fn(u8) -> bool) -> bool {
    text.bytes().fold(true, |all, b| all & plain(b))
}

/// Escapes what must not reach a text log raw: control characters (`\n` `\r` `\t`
/// as such, others as `\x1b`, `\u{85}`), and bidi and invisible characters that
/// reorder or hide text (`\u{202e}`). Everything else is kept.
pub fn escape_log_text(text: &str) -> std::borrow::Cow<'_, str> {
    let needs = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{061c}' | '\u{feff}')
    };
    // Printable ASCII, as most fields are, needs nothing: told without decoding.
    if every_byte(text, |b| (0x20..0x7f).contains(&b)) || !text.chars().any(needs) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs(c) && (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if needs(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn log_text_escapes_control_bidi_and_invisible_characters() {
        assert_eq!(escape_log_text("plain tool_name é"), "plain tool_name é");
        assert_eq!(
            escape_log_text("x\n2026-01-01 INFO approval settled\u{1b}[2J\r\t\u{7f}\u{85}"),
            "x\\n2026-01-01 INFO approval settled\\x1b[2J\\r\\t\\x7f\\u{85}"
        );
        assert_eq!(
            escape_log_text("a\u{202e}b\u{200b}c"),
            "a\\u{202e}b\\u{200b}c"
        );
    }

    #[test]
    fn the_text_format_escapes_every_field_and_the_message() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .fmt_fields(escaping_fields())
            .finish();
        let evil = "t\n2026 INFO forged\u{1b}[2J";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("call", tool = %evil);
            let _entered = span.enter();
            tracing::info!(reason = %evil, debug = ?evil, plain = evil, quoted = "a \"b\"", simple = "a b", "decided {evil}");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(
            text.contains("decided t\\n2026 INFO forged\\x1b[2J"),
            "{text}"
        );
        assert!(text.contains("call{tool=t\\n2026"), "{text}");
        assert!(text.contains("reason=t\\n2026"), "{text}");
        // Strings read as `Debug` prints them, whether or not they needed escaping.
        assert!(text.contains(r#" quoted="a \"b\"" simple="a b""#), "{text}");
    }
}
