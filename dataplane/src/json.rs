//! Byte-level helpers for request bodies, response bodies and stream events: a strict
//! scanner that finds the values of a few top-level keys of a JSON object without building
//! anything.
//!
//! The scanner accepts exactly the documents `serde_json` accepts when it deserializes a
//! struct whose unknown fields are ignored (RFC 8259 grammar; strings in skipped values are
//! not UTF-8 checked, top-level keys are), or it gives up. Giving up is not an error: callers
//! then run `serde_json` itself, so every unusual document (escaped or duplicate keys, a
//! top-level array, deep nesting, anything malformed) gets exactly serde's answer, and only
//! the common, well-formed case takes the fast path.

use wide::u8x16;

/// The byte at `i`, or 0 past the end (0 is never valid where a structural byte is read).
#[inline(always)]
fn at(b: &[u8], i: usize) -> u8 {
    if i < b.len() {
        b[i]
    } else {
        0
    }
}

#[inline(always)]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(at(b, i), b' ' | b'\n' | b'\t' | b'\r') {
        i += 1;
    }
    i
}

/// Deeper than this the scanner gives up (serde skips any depth; the caller falls back).
const MAX_DEPTH: u32 = 64;

/// Bit `k` is set when `b[i + k]` (`k` < 16) is a `"`, a `\` or a control character: where
/// a string may end, escapes, or is malformed. Sixteen bytes in a handful of vector
/// instructions (`wide` maps them to SSE2 or NEON, and to scalar code elsewhere).
#[inline(always)]
fn stops16(b: &[u8], i: usize) -> u32 {
    let block: [u8; 16] = b[i..i + 16].try_into().expect("16 bytes");
    let v = u8x16::new(block);
    let quote = v.simd_eq(u8x16::splat(b'"'));
    let backslash = v.simd_eq(u8x16::splat(b'\\'));
    let control = v.min(u8x16::splat(0x1f)).simd_eq(v);
    (quote | backslash | control).to_bitmask()
}

/// `b[j]` is a backslash: the length of the escape it starts, if serde accepts it.
#[inline(always)]
fn escape_len(b: &[u8], j: usize) -> Option<usize> {
    match at(b, j + 1) {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(2),
        b'u' => b
            .get(j + 2..j + 6)?
            .iter()
            .all(u8::is_ascii_hexdigit)
            .then_some(6),
        _ => None,
    }
}

/// `b[i]` is the opening quote; returns the index just past the closing quote and whether
/// the string has an escape. Rejects what serde rejects in a string it skips: control
/// characters and invalid escapes.
///
/// Sixteen bytes are classified at once and every stop in them is handled from the bit mask,
/// so a prompt with an escaped newline or quote every few words costs about as much as one
/// without.
fn skip_string(b: &[u8], i: usize) -> Option<(usize, bool)> {
    let mut i = i + 1;
    let mut escaped = false;
    'blocks: while i + 16 <= b.len() {
        let mut stops = stops16(b, i);
        while stops != 0 {
            let j = i + stops.trailing_zeros() as usize;
            match b[j] {
                b'"' => return Some((j + 1, escaped)),
                b'\\' => {
                    escaped = true;
                    let resume = j + escape_len(b, j)?;
                    if resume >= i + 16 {
                        i = resume;
                        continue 'blocks;
                    }
                    // The escaped byte (and a `\u`'s digits) are not stops.
                    stops &= u32::MAX << (resume - i);
                }
                _ => return None, // a control character
            }
        }
        i += 16;
    }
    // The last few bytes of the document.
    loop {
        match at(b, i) {
            b'"' if i < b.len() => return Some((i + 1, escaped)),
            b'\\' => {
                escaped = true;
                i += escape_len(b, i)?;
            }
            0..=0x1f => return None, // a control character, or the end
            _ => i += 1,
        }
    }
}

#[inline(always)]
fn skip_digits(b: &[u8], mut i: usize) -> usize {
    while at(b, i).is_ascii_digit() {
        i += 1;
    }
    i
}

/// `-`? (`0` | [1-9][0-9]*) (`.` [0-9]+)? ([eE] [+-]? [0-9]+)?
/// serde rejects a digit right after a leading zero (`01`); so does the caller's structural
/// check, as nothing but `,` `]` `}` or whitespace may follow a value.
fn skip_number(b: &[u8], mut i: usize) -> Option<usize> {
    if b[i] == b'-' {
        i += 1;
    }
    match at(b, i) {
        b'0' => i += 1,
        b'1'..=b'9' => i = skip_digits(b, i + 1),
        _ => return None,
    }
    if at(b, i) == b'.' {
        let end = skip_digits(b, i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if matches!(at(b, i), b'e' | b'E') {
        i += 1;
        if matches!(at(b, i), b'+' | b'-') {
            i += 1;
        }
        let end = skip_digits(b, i);
        if end == i {
            return None;
        }
        i = end;
    }
    Some(i)
}

#[inline(always)]
fn skip_literal(b: &[u8], i: usize, lit: &[u8]) -> Option<usize> {
    (b.get(i..i + lit.len())? == lit).then_some(i + lit.len())
}

/// `b[i]` starts a value (no leading whitespace); returns the index just past it. Iterative,
/// with the open containers kept as bits (1: object) of a `u64`.
fn skip_value(b: &[u8], mut i: usize, depth: u32) -> Option<usize> {
    let mut stack: u64 = 0;
    let mut open: u32 = 0;
    'value: loop {
        // A value starts at `i`.
        match at(b, i) {
            b'"' => i = skip_string(b, i)?.0,
            b'{' | b'[' => {
                let object = b[i] == b'{';
                i = skip_ws(b, i + 1);
                if at(b, i) == if object { b'}' } else { b']' } {
                    i += 1;
                } else {
                    if open + depth >= MAX_DEPTH {
                        return None;
                    }
                    stack = (stack << 1) | u64::from(object);
                    open += 1;
                    if object {
                        i = skip_key(b, i)?;
                    }
                    continue 'value;
                }
            }
            b't' => i = skip_literal(b, i, b"true")?,
            b'f' => i = skip_literal(b, i, b"false")?,
            b'n' => i = skip_literal(b, i, b"null")?,
            b'-' | b'0'..=b'9' => i = skip_number(b, i)?,
            _ => return None,
        }
        // After a value: close containers until one continues with `,`.
        loop {
            if open == 0 {
                return Some(i);
            }
            let object = stack & 1 == 1;
            i = skip_ws(b, i);
            match at(b, i) {
                b',' => {
                    i = skip_ws(b, i + 1);
                    if object {
                        i = skip_key(b, i)?;
                    }
                    continue 'value;
                }
                b'}' if object => {}
                b']' if !object => {}
                _ => return None,
            }
            i += 1;
            stack >>= 1;
            open -= 1;
        }
    }
}

/// `b[i]` starts an object key (no leading whitespace): skips `"key" :` and the whitespace
/// after it.
#[inline]
fn skip_key(b: &[u8], i: usize) -> Option<usize> {
    if at(b, i) != b'"' {
        return None;
    }
    let i = skip_ws(b, skip_string(b, i)?.0);
    if at(b, i) != b':' {
        return None;
    }
    Some(skip_ws(b, i + 1))
}

/// Calls `field(key, raw value)` for each member of the object starting at `b[i]` (a `{`),
/// in order; returns the index just past the object. `None` when the object is malformed,
/// nests too deeply, has a key with an escape or invalid UTF-8, or `field` gives up.
pub fn fields<'a>(
    b: &'a [u8],
    i: usize,
    mut field: impl FnMut(&'a [u8], &'a [u8]) -> Option<()>,
) -> Option<usize> {
    if at(b, i) != b'{' {
        return None;
    }
    let mut i = skip_ws(b, i + 1);
    if at(b, i) == b'}' {
        return Some(i + 1);
    }
    loop {
        if at(b, i) != b'"' {
            return None;
        }
        let (key_end, escaped) = skip_string(b, i)?;
        let key = &b[i + 1..key_end - 1];
        if escaped || (!key.is_ascii() && std::str::from_utf8(key).is_err()) {
            return None;
        }
        i = skip_ws(b, key_end);
        if at(b, i) != b':' {
            return None;
        }
        let start = skip_ws(b, i + 1);
        let end = skip_value(b, start, 1)?;
        field(key, &b[start..end])?;
        i = skip_ws(b, end);
        match at(b, i) {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// For a document that is one JSON object, the raw value (without surrounding whitespace)
/// of each of `keys` present at its top level. `None` means "not sure": the document is
/// not an object, is malformed, nests too deeply, has a top-level key with an escape or
/// invalid UTF-8, or repeats one of `keys` — the caller then asks `serde_json`.
pub fn top_level<'a, const N: usize>(
    json: &'a [u8],
    keys: [&[u8]; N],
) -> Option<[Option<&'a [u8]>; N]> {
    let mut found: [Option<&'a [u8]>; N] = [None; N];
    let end = fields(json, skip_ws(json, 0), |key, value| {
        if let Some(k) = keys.iter().position(|k| k.len() == key.len() && *k == key) {
            if found[k].is_some() {
                return None;
            }
            found[k] = Some(value);
        }
        Some(())
    })?;
    (skip_ws(json, end) == json.len()).then_some(found)
}

/// A raw value that is an unsigned integer literal (no sign, fraction or exponent) of at
/// most 19 digits (every token count; longer ones go to serde, which gives the same answer).
pub fn plain_u64(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() || raw.len() > 19 || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    raw.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// A raw value that is `null`.
pub fn is_null(raw: &[u8]) -> bool {
    raw == b"null"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the scanner answers must be what serde answers.
    fn agrees(doc: &str) {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct Two {
            a: Option<serde::de::IgnoredAny>,
            b: Option<serde::de::IgnoredAny>,
        }
        let serde_ok = serde_json::from_str::<Two>(doc).is_ok();
        if let Some(found) = top_level(doc.as_bytes(), [b"a", b"b"]) {
            assert!(serde_ok, "scanner accepted what serde rejects: {doc}");
            let v: serde_json::Value = serde_json::from_str(doc).unwrap();
            for (k, raw) in ["a", "b"].iter().zip(found) {
                let expect = v.get(*k).map(|x| x.to_string());
                let got = raw.map(|r| {
                    serde_json::from_slice::<serde_json::Value>(r)
                        .unwrap()
                        .to_string()
                });
                assert_eq!(got, expect, "{doc}");
            }
        }
    }

    #[test]
    fn scanner_never_accepts_what_serde_rejects() {
        for doc in [
            r#"{"a":1,"b":[1,2,{"x":null}],"c":"\u00e9\n"}"#,
            r#" { "a" : { } , "b" : [ ] } "#,
            r#"{}"#,
            r#"{"a":-0.5e+10,"b":true,"z":false}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":1e}"#,
            r#"{"a":-}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":{"x":1,}}"#,
            r#"{"a":1,}"#,
            r#"{"a":1} x"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12g4"}"#,
            "{\"a\":\"tab\there\"}",
            r#"{"a":nul}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"\u0061":1}"#,
            r#"[1,2]"#,
            r#"{"a" 1}"#,
            r#"{"a":1"b":2}"#,
            r#"{"a":"unterminated}"#,
            r#"{"a":tru}"#,
            r#"{"a":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#,
            "",
            "{",
            r#"{"a":1"#,
        ] {
            agrees(doc);
        }
        assert!(top_level(br#"{"a":1,"b":"x"}"#, [b"a", b"b"]).is_some());
        assert!(
            top_level(br#"{"a":1,"a":2}"#, [b"a"]).is_none(),
            "duplicates: serde decides"
        );
    }

    /// Strings of every length around the 16-byte block boundaries, with a quote, an escape,
    /// a control character or the end of input at every position: the scanner ends the
    /// string where serde does, or refuses what serde refuses.
    #[test]
    fn strings_of_every_length_agree_with_serde() {
        let specials: [&str; 8] = ["\"", "\\n", "\\u00e9", "\u{1}", "\u{1f}", "\0", "\t", "\\q"];
        for len in 0..100 {
            for pos in 0..=len {
                for special in specials {
                    let mut text: String = "abcdefghij".chars().cycle().take(len).collect();
                    text.insert_str(pos, special);
                    agrees(&format!(r#"{{"a":"{text}","b":1}}"#));
                    agrees(&format!(r#"{{"a":"{text}"#));
                    agrees(&format!(r#"{{"a":["{text}"],"b":"{text}"}}"#));
                    if special.starts_with("\\n") || special.starts_with("\\u") {
                        let doc = format!(r#"{{"a":"{text}","b":1}}"#);
                        assert!(top_level(doc.as_bytes(), [b"a", b"b"]).is_some(), "{doc}");
                    }
                }
            }
            // A long prompt with multi-byte UTF-8 and escapes is read, and `b` found after it.
            let prompt = "héllo \\n\\\"wörld\\\" ".repeat(len);
            let doc = format!(r#"{{"a":"{prompt}","b":{len}}}"#);
            let found = top_level(doc.as_bytes(), [b"a", b"b"]).expect("well-formed");
            assert_eq!(found[1], Some(len.to_string().as_bytes()));
            agrees(&doc);
        }
    }
}
