//! Reads `strategy_options`, the JSON text `configure` receives, for the
//! built-in strategy modules.
//!
//! The options are a flat JSON object of a few numbers, so this is a small
//! strict parser rather than serde_json, which would add tens of kilobytes to
//! each module. It accepts exactly RFC 8259 JSON, keeps nested values only as
//! their kind (no option takes one), and gives the messages an operator sees
//! when `configure` refuses the options: every one names the key at fault.
//!
//! `null` counts as absent, so `{"balance_factor": null}` means the default.

/// One option's value. Numbers keep their text, so that an integer option can
/// refuse `1.5` and a float option can parse it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Number(&'a str),
    String(String),
    Array,
    Object,
}

impl Value<'_> {
    /// "a number", "an array"…: for "must be X, not Y" messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array => "an array",
            Value::Object => "an object",
        }
    }
}

/// The options of one `configure` call: the object's keys, all known.
#[derive(Debug)]
pub struct Options<'a> {
    entries: Vec<(String, Value<'a>)>,
}

/// Parses `text` as a JSON object whose keys are all in `known`.
///
/// Errors: ``strategy_options is not valid JSON (at byte 7): …``,
/// ``strategy_options must be a JSON object, not an array``,
/// ``unknown option `tabel_size`; known: table_size, balance_factor``,
/// ``duplicate option `table_size` ``.
pub fn parse<'a>(text: &'a str, known: &[&str]) -> Result<Options<'a>, String> {
    let mut parser = Parser { text, at: 0 };
    let entries = parser.document().map_err(|(at, what)| {
        format!("strategy_options is not valid JSON (at byte {at}): {what}")
    })?;
    let entries = match entries {
        Top::Object(entries) => entries,
        Top::Other(value) => {
            return Err(format!(
                "strategy_options must be a JSON object, not {}",
                value.kind()
            ));
        }
    };
    for (i, (key, _)) in entries.iter().enumerate() {
        if !known.contains(&key.as_str()) {
            return Err(format!(
                "unknown option `{key}`; known: {}",
                known.join(", ")
            ));
        }
        if entries[..i].iter().any(|(k, _)| k == key) {
            return Err(format!("duplicate option `{key}`"));
        }
    }
    Ok(Options { entries })
}

impl<'a> Options<'a> {
    /// The value of `key`; none when absent or `null`.
    pub fn get(&self, key: &str) -> Option<&Value<'a>> {
        self.entries
            .iter()
            .find(|(k, v)| k == key && *v != Value::Null)
            .map(|(_, v)| v)
    }

    /// A finite number.
    pub fn f64(&self, key: &str) -> Result<Option<f64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(text)) => match number(text) {
                n if n.is_finite() => Ok(Some(n)),
                _ => Err(format!(
                    "option `{key}` must be a finite number, not {text}"
                )),
            },
            Some(other) => Err(format!(
                "option `{key}` must be a number, not {}",
                other.kind()
            )),
        }
    }

    /// A non-negative integer written without fraction or exponent.
    pub fn u64(&self, key: &str) -> Result<Option<u64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(text)) => text
                .parse::<u64>()
                .map(Some)
                .map_err(|_| format!("option `{key}` must be a non-negative integer, not {text}")),
            Some(other) => Err(format!(
                "option `{key}` must be a non-negative integer, not {}",
                other.kind()
            )),
        }
    }

    /// A number's text as written, for messages: formatting an f64 would
    /// bring in float printing, some 10 KB of code.
    pub fn text(&self, key: &str) -> Option<&'a str> {
        match self.get(key) {
            Some(Value::Number(text)) => Some(text),
            _ => None,
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(format!(
                "option `{key}` must be true or false, not {}",
                other.kind()
            )),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&str>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(format!(
                "option `{key}` must be a string, not {}",
                other.kind()
            )),
        }
    }
}

/// The value of a JSON number's text (already checked against the grammar).
///
/// Not `str::parse::<f64>`, whose exact algorithm is most of a module's size:
/// up to 19 significant digits become an integer m and the rest a power of
/// ten e, and the value is m × 10^e. For up to 15 digits and |e| <= 22 that
/// is one correctly rounded operation on exact operands, so the same value
/// `parse` gives; beyond, within a few units in the last place.
fn number(text: &str) -> f64 {
    let bytes = text.as_bytes();
    let (negative, mut i) = match bytes.first() {
        Some(b'-') => (true, 1),
        _ => (false, 0),
    };
    let (mut mantissa, mut digits, mut exponent) = (0u64, 0u32, 0i64);
    let mut fraction = false;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'0'..=b'9' => {
                if digits < 19 {
                    mantissa = mantissa * 10 + u64::from(b - b'0');
                    if mantissa != 0 {
                        digits += 1;
                    }
                    if fraction {
                        exponent -= 1;
                    }
                } else if !fraction {
                    exponent += 1;
                }
            }
            b'.' => fraction = true,
            _ => break,
        }
        i += 1;
    }
    if let Some(b'e' | b'E') = bytes.get(i) {
        i += 1;
        let sign = match bytes.get(i) {
            Some(b'-') => {
                i += 1;
                -1
            }
            Some(b'+') => {
                i += 1;
                1
            }
            _ => 1,
        };
        let mut e = 0i64;
        while let Some(&b @ b'0'..=b'9') = bytes.get(i) {
            e = (e * 10 + i64::from(b - b'0')).min(100_000);
            i += 1;
        }
        exponent += sign * e;
    }
    let mut value = mantissa as f64;
    if mantissa != 0 {
        // 10^22 is the largest power of ten an f64 holds exactly.
        const EXACT: [f64; 23] = [
            1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
            1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
        ];
        let mut e = exponent;
        while e > 0 && value.is_finite() {
            let step = e.min(22);
            value *= EXACT[step as usize];
            e -= step;
        }
        while e < 0 && value != 0.0 {
            let step = (-e).min(22);
            value /= EXACT[step as usize];
            e += step;
        }
    }
    if negative { -value } else { value }
}

enum Top<'a> {
    Object(Vec<(String, Value<'a>)>),
    Other(Value<'a>),
}

/// Byte offset and what was expected there.
type Error = (usize, &'static str);

/// Deep enough for any sane option; bounds the recursion of a hostile one.
const MAX_DEPTH: usize = 64;

struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Parser<'a> {
    fn document(&mut self) -> Result<Top<'a>, Error> {
        self.space();
        let top = if self.peek() == Some(b'{') {
            Top::Object(self.object()?)
        } else {
            Top::Other(self.value(0)?)
        };
        self.space();
        if self.at != self.text.len() {
            return Err((self.at, "nothing after the value"));
        }
        Ok(top)
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    /// The text between two ASCII bytes' offsets (never a panic: the
    /// boundaries are always ASCII, and str slicing would bring in its
    /// panic message's formatting).
    fn slice(&self, start: usize, end: usize) -> &'a str {
        let text: &'a str = self.text;
        text.get(start..end).unwrap_or_default()
    }

    fn space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8, what: &'static str) -> Result<(), Error> {
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err((self.at, what))
        }
    }

    /// The top-level object, its values kept.
    fn object(&mut self) -> Result<Vec<(String, Value<'a>)>, Error> {
        let mut entries = Vec::new();
        self.members(0, |key, value| entries.push((key, value)))?;
        Ok(entries)
    }

    /// `{ "key": value, … }`, handing each member to `each`.
    fn members(
        &mut self,
        depth: usize,
        mut each: impl FnMut(String, Value<'a>),
    ) -> Result<(), Error> {
        self.eat(b'{', "`{`")?;
        self.space();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(());
        }
        loop {
            self.space();
            let key = self.string()?;
            self.space();
            self.eat(b':', "`:` after a key")?;
            let value = self.value(depth + 1)?;
            each(key, value);
            self.space();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err((self.at, "`,` or `}`")),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value<'a>, Error> {
        if depth > MAX_DEPTH {
            return Err((self.at, "less nesting"));
        }
        self.space();
        match self.peek() {
            Some(b'{') => {
                self.members(depth, |_, _| {})?;
                Ok(Value::Object)
            }
            Some(b'[') => {
                self.at += 1;
                self.space();
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return Ok(Value::Array);
                }
                loop {
                    self.value(depth + 1)?;
                    self.space();
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Value::Array);
                        }
                        _ => return Err((self.at, "`,` or `]`")),
                    }
                }
            }
            Some(b'"') => Ok(Value::String(self.string()?)),
            Some(b't') => self.word("true", Value::Bool(true)),
            Some(b'f') => self.word("false", Value::Bool(false)),
            Some(b'n') => self.word("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err((self.at, "a value")),
        }
    }

    fn word(&mut self, word: &'static str, value: Value<'a>) -> Result<Value<'a>, Error> {
        if self.text.as_bytes()[self.at..].starts_with(word.as_bytes()) {
            self.at += word.len();
            Ok(value)
        } else {
            Err((self.at, "a value"))
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`, kept as text.
    fn number(&mut self) -> Result<Value<'a>, Error> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err((self.at, "a digit")),
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.first_digit()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.first_digit()?;
        }
        Ok(Value::Number(self.slice(start, self.at)))
    }

    fn first_digit(&mut self) -> Result<(), Error> {
        match self.peek() {
            Some(b'0'..=b'9') => {
                self.digits();
                Ok(())
            }
            _ => Err((self.at, "a digit")),
        }
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    fn string(&mut self) -> Result<String, Error> {
        self.eat(b'"', "a string")?;
        let mut out = String::new();
        loop {
            // Copy the run up to the next quote, backslash or control byte at
            // once; every such byte is ASCII, so the slice ends on a char boundary.
            let run = self.text.as_bytes()[self.at..]
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .ok_or((self.text.len(), "the string's closing `\"`"))?;
            out.push_str(self.slice(self.at, self.at + run));
            self.at += run;
            match self.peek() {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.at += 1;
                    let escaped = match self.peek() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.at += 1;
                            out.push(self.unicode_escape()?);
                            continue;
                        }
                        _ => return Err((self.at, "an escape: one of \"\\/bfnrtu")),
                    };
                    self.at += 1;
                    out.push(escaped);
                }
                _ => return Err((self.at, "no control character in a string")),
            }
        }
    }

    /// After `\u`: four hex digits, and a second `\uXXXX` for a surrogate pair.
    fn unicode_escape(&mut self) -> Result<char, Error> {
        let high = self.hex4()?;
        let code = match high {
            0xD800..=0xDBFF => {
                if !self.text.as_bytes()[self.at..].starts_with(b"\\u") {
                    return Err((self.at, "the low half of a surrogate pair"));
                }
                self.at += 2;
                let low = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&low) {
                    return Err((self.at, "the low half of a surrogate pair"));
                }
                0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err((self.at, "no lone low surrogate")),
            _ => high,
        };
        char::from_u32(code).ok_or((self.at, "a valid code point"))
    }

    fn hex4(&mut self) -> Result<u32, Error> {
        let digits = self
            .text
            .as_bytes()
            .get(self.at..self.at + 4)
            .ok_or((self.at, "four hex digits"))?;
        let mut code = 0;
        for &b in digits {
            let digit = (b as char)
                .to_digit(16)
                .ok_or((self.at, "four hex digits"))?;
            code = code * 16 + digit;
        }
        self.at += 4;
        Ok(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["a", "b", "c"];

    #[test]
    fn reads_the_option_kinds() {
        let o = parse(
            r#" { "a": 65537, "b": 1.25e1, "c": "x\"\u00e9\ud83d\ude00" } "#,
            KNOWN,
        )
        .unwrap();
        assert_eq!(o.u64("a"), Ok(Some(65537)));
        assert_eq!(o.f64("a"), Ok(Some(65537.0)));
        assert_eq!(o.f64("b"), Ok(Some(12.5)));
        assert_eq!(o.str("c"), Ok(Some("x\"é😀")));
        assert_eq!(o.u64("missing"), Ok(None));
    }

    #[test]
    fn numbers_read_as_parse_reads_them() {
        for text in [
            "0",
            "-0",
            "1",
            "1.25",
            "1.1",
            "0.1",
            "65537",
            "1e3",
            "1E+3",
            "2.5e-3",
            "-7.75",
            "123456789012345",
            "0.000001",
            "1e22",
            "1e-22",
            "3.141592653589793",
        ] {
            assert_eq!(number(text), text.parse::<f64>().unwrap(), "{text}");
        }
        for text in [
            "12345678901234567890123",
            "1.7976931348623157e308",
            "4.9e-324",
            "1e-400",
        ] {
            let (ours, exact) = (number(text), text.parse::<f64>().unwrap());
            assert!(
                (ours - exact).abs() <= exact.abs() * 1e-15,
                "{text}: {ours} vs {exact}"
            );
        }
        assert_eq!(number("1e999"), f64::INFINITY);
        assert_eq!(number("1e400000000000"), f64::INFINITY);
    }

    #[test]
    fn empty_object_and_null_mean_defaults() {
        let o = parse("{}", KNOWN).unwrap();
        assert_eq!(o.f64("a"), Ok(None));
        let o = parse(r#"{"a": null}"#, KNOWN).unwrap();
        assert_eq!(o.f64("a"), Ok(None));
        assert_eq!(o.bool("a"), Ok(None));
    }

    #[test]
    fn unknown_and_duplicate_keys_are_named() {
        assert_eq!(
            parse(r#"{"a": 1, "tabel": 2}"#, KNOWN).unwrap_err(),
            "unknown option `tabel`; known: a, b, c"
        );
        assert_eq!(
            parse(r#"{"a": 1, "a": 2}"#, KNOWN).unwrap_err(),
            "duplicate option `a`"
        );
    }

    #[test]
    fn wrong_types_name_the_key() {
        let o = parse(r#"{"a": "7", "b": [1, {"x": []}], "c": true}"#, KNOWN).unwrap();
        assert_eq!(
            o.u64("a").unwrap_err(),
            "option `a` must be a non-negative integer, not a string"
        );
        assert_eq!(
            o.f64("b").unwrap_err(),
            "option `b` must be a number, not an array"
        );
        assert_eq!(
            o.str("c").unwrap_err(),
            "option `c` must be a string, not a boolean"
        );
        assert_eq!(
            o.bool("a").unwrap_err(),
            "option `a` must be true or false, not a string"
        );
        let o = parse(r#"{"a": 1.5, "b": -3, "c": 1e999}"#, KNOWN).unwrap();
        assert_eq!(
            o.u64("a").unwrap_err(),
            "option `a` must be a non-negative integer, not 1.5"
        );
        assert_eq!(
            o.u64("b").unwrap_err(),
            "option `b` must be a non-negative integer, not -3"
        );
        assert_eq!(
            o.f64("c").unwrap_err(),
            "option `c` must be a finite number, not 1e999"
        );
        assert_eq!(o.text("b"), Some("-3"));
    }

    #[test]
    fn only_an_object_is_options() {
        assert_eq!(
            parse("[]", KNOWN).unwrap_err(),
            "strategy_options must be a JSON object, not an array"
        );
        assert_eq!(
            parse("3", KNOWN).unwrap_err(),
            "strategy_options must be a JSON object, not a number"
        );
    }

    #[test]
    fn refuses_what_is_not_json() {
        for bad in [
            "",
            "{",
            "{\"a\" 1}",
            "{\"a\": 01}",
            "{\"a\": 1.}",
            "{\"a\": .5}",
            "{\"a\": +1}",
            "{\"a\": 1,}",
            "{\"a\": [1,]}",
            "{\"a\": tru}",
            "{\"a\": \"\\x\"}",
            "{\"a\": \"\\ud800\"}",
            "{\"a\": \"\\udc00\"}",
            "{\"a\": \"\n\"}",
            "{\"a\": 1} x",
            "{'a': 1}",
            "{\"a\": \"unterminated}",
        ] {
            let err = parse(bad, KNOWN).unwrap_err();
            assert!(
                err.starts_with("strategy_options is not valid JSON (at byte "),
                "{bad:?}: {err}"
            );
        }
        let deep = "[".repeat(100_000);
        assert!(parse(&format!("{{\"a\": {deep}}}"), KNOWN).is_err());
    }
}
