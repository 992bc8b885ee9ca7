//! What the router needs from a request body, and the rewrites it makes before forwarding.
//!
//! Only `model`, `stream`, `stream_options.include_usage` and the presence of `input` /
//! `messages` are read (borrowing, without building a JSON tree). The body is re-serialised
//! only when something must change — the model name (alias or real name), model-family
//! parameters, or the `include_usage` flag on a streaming request — so every other request is
//! forwarded byte-identical.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{value::RawValue, Map, Value};

/// The fields read from a client body.
#[derive(Debug, PartialEq, Eq)]
pub struct Probe<'a> {
    pub model: Cow<'a, str>,
    pub stream: bool,
    /// The client asked for the final usage chunk itself.
    pub include_usage: bool,
    /// A Responses-API body (`input` without `messages`): no `stream_options` for it.
    pub responses_input: bool,
    /// The body has a `stream_options` key (of any value).
    pub has_stream_options: bool,
}

#[derive(Deserialize)]
struct RawProbe<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    /// Present as `null` too (`Some`): a key of any value is replaced, never added twice.
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    input: Option<serde::de::IgnoredAny>,
    messages: Option<serde::de::IgnoredAny>,
}

/// A key's raw value, `null` included (serde's `Option` would read `null` as absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

impl<'a> Probe<'a> {
    /// `None` when the body is not a JSON object with a string `model`.
    pub fn read(body: &'a [u8]) -> Option<Probe<'a>> {
        const KEYS: [&[u8]; 5] = [
            b"model",
            b"stream",
            b"stream_options",
            b"input",
            b"messages",
        ];
        if let Some(found) = crate::json::top_level(body, KEYS) {
            if let Some(probe) = Self::from_raw(found) {
                return probe;
            }
        }
        Self::read_serde(body)
    }

    /// The probe from the raw top-level values, as serde would read them; `None` when unsure
    /// (an escaped or non-UTF-8 string), left to [`Probe::read_serde`].
    fn from_raw(
        [model, stream, stream_options, input, messages]: [Option<&'a [u8]>; 5],
    ) -> Option<Option<Probe<'a>>> {
        use crate::json::is_null;
        let present = |raw: Option<&'a [u8]>| raw.filter(|r| !is_null(r));
        // Serde borrows these as `&RawValue`, which must be UTF-8.
        let utf8 = |raw: Option<&'a [u8]>| match present(raw) {
            Some(r) => std::str::from_utf8(r).ok().map(Some),
            None => Some(None),
        };
        let model = match present(model) {
            None => None,
            Some(raw) if raw[0] == b'"' => {
                let inner = &raw[1..raw.len() - 1];
                if inner.contains(&b'\\') {
                    return None;
                }
                Some(std::str::from_utf8(inner).ok()?)
            }
            Some(_) => return Some(None), // not a string: serde refuses the body
        };
        let has_stream_options = stream_options.is_some();
        let stream = utf8(stream)?;
        let stream_options = utf8(stream_options)?;
        let include_usage = include_usage(stream_options);
        Some(Some(Probe {
            model: Cow::Borrowed(model.filter(|m| !m.is_empty())?),
            stream: stream == Some("true"),
            include_usage,
            responses_input: present(input).is_some() && present(messages).is_none(),
            has_stream_options,
        }))
    }

    fn read_serde(body: &'a [u8]) -> Option<Probe<'a>> {
        let raw: RawProbe<'a> = serde_json::from_slice(body).ok()?;
        let include_usage = include_usage(raw.stream_options.map(|o| o.get()));
        Some(Probe {
            model: raw.model.filter(|m| !m.is_empty())?,
            stream: raw.stream.is_some_and(|s| s.get() == "true"),
            include_usage,
            responses_input: raw.input.is_some() && raw.messages.is_none(),
            has_stream_options: raw.stream_options.is_some(),
        })
    }
}

/// `stream_options.include_usage` of a raw `stream_options` value (false when absent or not
/// an object serde reads).
fn include_usage(stream_options: Option<&str>) -> bool {
    stream_options
        .and_then(|o| serde_json::from_str::<StreamOptions>(o).ok())
        .and_then(|o| o.include_usage)
        .unwrap_or(false)
}

/// The body to send upstream and whether the router asked for a usage chunk the client did
/// not (so it must strip it from the stream).
#[derive(Debug)]
pub struct Rewritten {
    pub body: Bytes,
    pub injected_usage: bool,
}

/// Applies the forwarding rewrites (spec §11.3): model name, model-family parameters, and
/// `stream_options.include_usage` for streaming requests. `Err` (why, for a 400) when a
/// rewrite is needed and the body cannot be read as a JSON tree — forwarding it unchanged
/// would send the alias instead of the model, or stream without usage (uncounted tokens).
pub fn rewrite(
    body: Bytes,
    probe: &Probe<'_>,
    upstream_model: &str,
    family_model_id: &str,
) -> Result<Rewritten, String> {
    let inject = probe.stream && !probe.include_usage && !probe.responses_input;
    let rules = family_rules(family_model_id);
    let rename = upstream_model != probe.model;
    if inject && !rename && rules.is_none() && !probe.has_stream_options {
        // The common streaming case: add the key after the opening brace instead of
        // re-serialising the whole body (which costs a full parse for long prompts). The body
        // is a JSON object with a `model` key and no `stream_options` key, so this stays valid.
        if let Some(at) = after_brace(&body) {
            let mut out = Vec::with_capacity(body.len() + USAGE_KEY.len());
            out.extend_from_slice(&body[..at]);
            out.extend_from_slice(USAGE_KEY);
            out.extend_from_slice(&body[at..]);
            return Ok(Rewritten {
                body: Bytes::from(out),
                injected_usage: true,
            });
        }
    }
    if !inject && !rename && rules.is_none() {
        return Ok(Rewritten {
            body,
            injected_usage: false,
        });
    }
    if rules.is_none() {
        if let Some(out) = splice(&body, rename.then_some(upstream_model), inject) {
            return Ok(Rewritten {
                body: out,
                injected_usage: inject,
            });
        }
    }
    let mut obj = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(obj)) => obj,
        Ok(_) => return Err("the body is not a JSON object".into()),
        Err(e) => {
            return Err(format!(
                "the body cannot be rewritten for model {upstream_model:?}: {e}; send it as \
                 valid JSON (UTF-8, no lone \\u surrogate escapes)"
            ))
        }
    };
    let mut changed = false;
    if rename {
        obj.insert("model".into(), Value::String(upstream_model.to_owned()));
        changed = true;
    }
    if let Some(rules) = rules {
        changed |= apply_family_rules(&mut obj, rules);
    }
    if inject {
        match obj.get_mut("stream_options") {
            Some(Value::Object(opts)) => {
                opts.insert("include_usage".into(), Value::Bool(true));
            }
            _ => {
                let mut opts = Map::new();
                opts.insert("include_usage".into(), Value::Bool(true));
                obj.insert("stream_options".into(), Value::Object(opts));
            }
        }
        changed = true;
    }
    if !changed {
        return Ok(Rewritten {
            body,
            injected_usage: false,
        });
    }
    Ok(Rewritten {
        body: Bytes::from(serde_json::to_vec(&Value::Object(obj)).expect("JSON value serialises")),
        injected_usage: inject,
    })
}

/// The `stream_options` key a streaming body without one gets, as the first key of the object.
const USAGE_KEY: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// Where [`USAGE_KEY`] goes: after the opening brace. The object has a `model` key, so a
/// comma after it keeps the body valid.
fn after_brace(body: &[u8]) -> Option<usize> {
    Some(body.iter().position(|&b| b == b'{')? + 1)
}

/// The model rename and the usage flag written into the raw body: the top-level `model` and
/// `stream_options` values are replaced where they stand (`stream_options` is added after the
/// opening brace when absent). No JSON tree is built, so a long prompt costs one scan, and a
/// body whose prompt serde_json cannot build a tree of (a lone surrogate escape, a number
/// beyond `f64`, deep nesting) is still rewritten. `None` when the scan is unsure (an escaped
/// key, a repeated one): the caller then builds the tree.
fn splice(body: &[u8], model: Option<&str>, inject: bool) -> Option<Bytes> {
    let [model_raw, options_raw] =
        crate::json::top_level(body, [b"model".as_slice(), b"stream_options".as_slice()])?;
    let span = |raw: &[u8]| {
        let start = raw.as_ptr() as usize - body.as_ptr() as usize;
        start..start + raw.len()
    };
    let mut edits: Vec<(std::ops::Range<usize>, Vec<u8>)> = Vec::with_capacity(2);
    if let Some(name) = model {
        edits.push((span(model_raw?), serde_json::to_vec(name).ok()?));
    }
    if inject {
        match options_raw {
            Some(raw) => {
                // Anything but an object (`null`, a stray scalar) is replaced, as the tree
                // path does.
                let mut opts = match serde_json::from_slice::<Value>(raw).ok()? {
                    Value::Object(opts) => opts,
                    _ => Map::new(),
                };
                opts.insert("include_usage".into(), Value::Bool(true));
                edits.push((span(raw), serde_json::to_vec(&opts).ok()?));
            }
            None => {
                let at = after_brace(body)?;
                edits.push((at..at, USAGE_KEY.to_vec()));
            }
        }
    }
    edits.sort_by_key(|(range, _)| range.start);
    let mut out = Vec::with_capacity(body.len() + 48);
    let mut at = 0;
    for (range, with) in edits {
        out.extend_from_slice(&body[at..range.start]);
        out.extend_from_slice(&with);
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    Some(Bytes::from(out))
}

/// Parameter rules for reasoning-model families (spec §10.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyRules {
    remove: &'static [&'static str],
}

const O1_REMOVE: &[&str] = &[
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
];
const O3_REMOVE: &[&str] = &["temperature", "top_p"];

/// The rules for a model id: `o1*` and `o3*`/`gpt-5*` families, matched after stripping a
/// `prefix/` or `prefix:` and a `-chat`/`_chat` suffix, case-insensitively; a family matches
/// exactly or when followed by `-` or `.`.
pub fn family_rules(model_id: &str) -> Option<FamilyRules> {
    let base = model_id
        .rsplit(['/', ':'])
        .next()
        .unwrap_or(model_id)
        .as_bytes();
    let has_suffix =
        |s: &[u8]| base.len() >= s.len() && base[base.len() - s.len()..].eq_ignore_ascii_case(s);
    let base = if has_suffix(b"-chat") || has_suffix(b"_chat") {
        &base[..base.len() - 5]
    } else {
        base
    };
    let is = |family: &[u8]| {
        base.len() >= family.len()
            && base[..family.len()].eq_ignore_ascii_case(family)
            && matches!(base.get(family.len()), None | Some(b'-' | b'.'))
    };
    if is(b"o1") {
        Some(FamilyRules { remove: O1_REMOVE })
    } else if is(b"o3") || is(b"gpt-5") {
        Some(FamilyRules { remove: O3_REMOVE })
    } else {
        None
    }
}

fn apply_family_rules(obj: &mut Map<String, Value>, rules: FamilyRules) -> bool {
    let mut changed = false;
    if !obj.contains_key("max_completion_tokens") {
        if let Some(v) = obj.shift_remove("max_tokens") {
            obj.insert("max_completion_tokens".into(), v);
            changed = true;
        }
    }
    for key in rules.remove {
        changed |= obj.shift_remove(*key).is_some();
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_without_a_tree() {
        let p = Probe::read(br#"{"messages":[],"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(p.model, "gpt-4o");
        assert!(p.stream && p.include_usage && !p.responses_input);
        assert!(Probe::read(br#"{"model":5}"#).is_none());
        assert!(Probe::read(br#"{"model":""}"#).is_none());
        assert!(Probe::read(b"not json").is_none());
        assert!(
            !Probe::read(br#"{"model":"m","stream":"true"}"#)
                .unwrap()
                .stream
        );
        assert!(
            Probe::read(br#"{"model":"m","input":"hi"}"#)
                .unwrap()
                .responses_input
        );
    }

    #[test]
    fn the_scanner_reads_what_serde_reads() {
        for body in [
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi \"there\""}]}"#,
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"m","stream":null,"stream_options":null,"input":null,"messages":null}"#,
            r#"{"model":"m","stream":"true","stream_options":5}"#,
            r#"{"model":"m","stream": true ,"input":"x"}"#,
            r#"{"model":"m","input":[],"messages":[]}"#,
            r#"{"model":"\u00e9"}"#,
            r#"{"model":"é","stream":false}"#,
            r#"{"model":""}"#,
            r#"{"model":null}"#,
            r#"{"model":5}"#,
            r#"{"model":"a","model":"b"}"#,
            r#"{"messages":[]}"#,
            r#"["m"]"#,
            r#"{"model":"m",}"#,
            r#"{"model":"m"} x"#,
            r#"{"model":"m","stream_options":{"include_usage":"yes"}}"#,
            r#"{"model":"m","stream_options":{"x":[1,2,{"y":null}]}}"#,
            "not json",
            "",
        ] {
            assert_eq!(
                Probe::read(body.as_bytes()),
                Probe::read_serde(body.as_bytes()),
                "{body}"
            );
        }
        let mut bad = br#"{"model":"m","stream_options":"X"}"#.to_vec();
        let x = bad.iter().position(|&b| b == b'X').unwrap();
        bad[x] = 0xff;
        assert_eq!(Probe::read(&bad), Probe::read_serde(&bad), "invalid UTF-8");
    }

    #[test]
    fn untouched_bodies_stay_byte_identical() {
        let body = Bytes::from_static(br#"{ "model" : "m",  "x": 1 }"#);
        let p = Probe::read(&body).unwrap();
        let out = rewrite(body.clone(), &p, "m", "m").unwrap();
        assert_eq!(out.body, body);
        assert!(!out.injected_usage);
    }

    #[test]
    fn renames_and_injects_usage() {
        let body = Bytes::from_static(br#"{"model":"fast","stream":true,"messages":[]}"#);
        let p = Probe::read(&body).unwrap();
        let out = rewrite(body.clone(), &p, "gpt-4o-mini-2024", "small").unwrap();
        let v: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(v["model"], "gpt-4o-mini-2024");
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert!(out.injected_usage);
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(
            keys,
            ["stream_options", "model", "stream", "messages"],
            "the client's keys keep their order"
        );
    }

    #[test]
    fn a_null_stream_options_is_replaced_not_doubled() {
        let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":null,"messages":[]}"#,
        );
        let p = Probe::read(&body).unwrap();
        assert!(p.has_stream_options && !p.include_usage);
        assert_eq!(Probe::read_serde(&body).as_ref(), Some(&p));
        let out = rewrite(body.clone(), &p, "m", "m").unwrap();
        assert!(out.injected_usage);
        assert_eq!(
            std::str::from_utf8(&out.body).unwrap(),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#
        );
    }

    #[test]
    fn a_prompt_serde_cannot_build_a_tree_of_is_still_renamed() {
        // A lone surrogate escape (a JavaScript client cutting an emoji in half) and a number
        // beyond f64: valid to skip over, refused when building a tree.
        let body = Bytes::from_static(
            br#"{"model":"fast","stream":true,"stream_options":{"x":1},"messages":[{"role":"user","content":"\ud83d"}],"seed":1e400}"#,
        );
        let p = Probe::read(&body).unwrap();
        let out = rewrite(body.clone(), &p, "gpt-4o", "fast").unwrap();
        assert!(out.injected_usage);
        assert_eq!(
            std::str::from_utf8(&out.body).unwrap(),
            r#"{"model":"gpt-4o","stream":true,"stream_options":{"x":1,"include_usage":true},"messages":[{"role":"user","content":"\ud83d"}],"seed":1e400}"#
        );
        // A model-family rule needs the tree: a clear refusal, not a silent pass-through.
        let err = rewrite(body.clone(), &p, "o1", "o1").unwrap_err();
        assert!(
            err.contains(r#"cannot be rewritten for model "o1""#),
            "{err}"
        );
    }

    #[test]
    fn usage_flag_is_added_without_reserialising() {
        let body = Bytes::from_static(b" {\"model\": \"m\", \"stream\": true, \"x\": \"\\u00e9\"}");
        let p = Probe::read(&body).unwrap();
        let out = rewrite(body.clone(), &p, "m", "m").unwrap();
        assert!(out.injected_usage);
        assert_eq!(
            std::str::from_utf8(&out.body).unwrap(),
            " {\"stream_options\":{\"include_usage\":true},\"model\": \"m\", \"stream\": true, \"x\": \"\\u00e9\"}",
            "the rest of the body is untouched, escapes included"
        );
        let v: Value = serde_json::from_slice(&out.body).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        // An existing stream_options object is updated in place instead.
        let body = Bytes::from_static(br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#);
        let p = Probe::read(&body).unwrap();
        let v: Value =
            serde_json::from_slice(&rewrite(body.clone(), &p, "m", "m").unwrap().body).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"x": 1, "include_usage": true})
        );
    }

    #[test]
    fn family_rules_match_like_upstream() {
        assert!(family_rules("o1").is_some());
        assert!(family_rules("openai/o1-mini").is_some());
        assert!(family_rules("azure:O3-chat").is_some());
        assert!(family_rules("gpt-5.1").is_some());
        assert!(family_rules("o10").is_none());
        assert!(family_rules("gpt-4o").is_none());
        let body =
            Bytes::from_static(br#"{"model":"o1","max_tokens":5,"temperature":1,"logprobs":true}"#);
        let p = Probe::read(&body).unwrap();
        let v: Value =
            serde_json::from_slice(&rewrite(body.clone(), &p, "o1", "o1").unwrap().body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"model":"o1","max_completion_tokens":5})
        );
    }
}
