//! Parsing and validation of MLflow `MLmodel` files, without running Python.
//!
//! This module owns the question "is this directory a loadable MLflow model, and what does its
//! `MLmodel` say?". It is the only module in the crate that touches YAML: the registry and the
//! file system hand it the raw bytes of an `MLmodel` file plus a `lookup` callback that says what
//! a relative path is inside the model directory, and get back either the facts worth recording
//! ([`ModelInfo`]) or the first problem found ([`Invalid`]). It never touches the disk itself
//! (except in its tests), so callers decide how paths are resolved and what symlinks mean.
//!
//! The bytes are untrusted, so parsing is guarded in two layers:
//!
//! 1. Before the YAML parser sees anything, [`prescan`] walks the raw text with a small
//!    over-approximating model of libyaml's scanner and rejects flow nesting (`[`/`{`) deeper than
//!    [`MAX_DEPTH`] and more than [`MAX_ALIASES`] alias uses. This matters: libyaml (under
//!    `serde_yaml` 0.9) spends time quadratic in the flow depth while scanning (measured: 100,000
//!    levels of `{a: ` take 48 s in a release build), long before `serde_yaml`'s own recursion
//!    limit of 128 applies.
//! 2. While the parsed events are turned into a tree, a budgeted visitor caps the nesting depth,
//!    the number of nodes and the scalar bytes, counting every node an alias expands to.
//!    `serde_yaml`'s own "repetition limit" stops exponential alias bombs but not quadratic ones
//!    (a 15 KB document of one anchored 3,000-item list aliased 3,000 times expands to 9 million
//!    nodes and 1 GB of memory), so the budget, proportional to the input size, is what bounds
//!    memory.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};
use serde_json::{Map as JsonMap, Value as Json};
use serde_yaml::{Mapping, Value as Yaml};

/// The largest `MLmodel` accepted, in bytes.
pub const MAX_MLMODEL_BYTES: usize = 1 << 20;

/// The file name MLflow gives the model description; a directory without it is not a model.
pub const MLMODEL_FILE_NAME: &str = "MLmodel";

/// Deepest YAML nesting accepted (block or flow collections; the top-level mapping is level 1).
const MAX_DEPTH: usize = 64;

/// Most YAML alias uses (`*name`) accepted. MLflow never writes aliases; PyYAML only would for a
/// Python object shared inside the model description.
const MAX_ALIASES: usize = 64;

/// Most simultaneous interpretations the pre-parse scan keeps; real files need two or three.
const MAX_SCAN_STATES: usize = 16;

/// Deepest nesting of signature types (`array` of `object` of `map` ...).
const MAX_TYPE_DEPTH: usize = 32;

/// What a path named by MLmodel resolves to inside the model directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// A regular file (or anything else that is not a directory).
    File,
    /// A directory.
    Dir,
    /// Nothing there.
    Missing,
}

/// Facts extracted from a valid MLmodel, recorded by the registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelInfo {
    /// Flavor names, sorted.
    pub flavors: Vec<String>,
    pub run_id: Option<String>,
    pub artifact_path: Option<String>,
    pub model_uuid: Option<String>,
    pub model_id: Option<String>,
    pub utc_time_created: Option<String>,
    /// JSON text `{"inputs":[...],"outputs":[...],"params":[...]}` holding the non-null parts of
    /// the signature (as JSON lists, not strings), or `None` when there is no signature.
    pub signature: Option<String>,
    pub mlflow_version: Option<String>,
}

/// The first problem found, with a human message like "MLmodel is empty" / "MLmodel is not valid
/// YAML: ..." / "MLmodel has no flavors" / "flavor sklearn: pickled_model names model.pkl, which
/// does not exist".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid<T>(message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(message.into()))
}

/// Validate MLmodel bytes. `lookup` answers for a relative path (already normalised,
/// '/'-separated, no leading '/', never containing '..') what it is inside the model directory.
/// Whether symlinks are followed, and where to, is the caller's decision.
pub fn validate(bytes: &[u8], lookup: &dyn Fn(&str) -> PathKind) -> Result<ModelInfo, Invalid> {
    if bytes.len() > MAX_MLMODEL_BYTES {
        return invalid(format!(
            "MLmodel is {} bytes, more than the limit of {MAX_MLMODEL_BYTES} bytes",
            bytes.len()
        ));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => {
            return invalid(format!(
                "MLmodel is not valid UTF-8 (bad byte at offset {})",
                err.valid_up_to()
            ));
        }
    };
    // libyaml drops one leading byte order mark; do the same so the pre-scan sees what it sees.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return invalid("MLmodel is empty");
    }
    prescan(text)?;
    let root = parse(text)?;
    let root = match root {
        Yaml::Mapping(map) => map,
        Yaml::Null => return invalid("MLmodel is empty (it holds no YAML value)"),
        other => {
            return invalid(format!(
                "MLmodel is {}, not a mapping",
                with_article(kind(&other))
            ));
        }
    };

    let flavors = check_flavors(&root, lookup)?;
    check_input_example(&root, lookup)?;
    let signature = check_signature(&root)?;
    Ok(ModelInfo {
        flavors,
        run_id: scalar_field(&root, "run_id")?,
        artifact_path: scalar_field(&root, "artifact_path")?,
        model_uuid: scalar_field(&root, "model_uuid")?,
        model_id: scalar_field(&root, "model_id")?,
        utc_time_created: scalar_field(&root, "utc_time_created")?,
        signature,
        mlflow_version: scalar_field(&root, "mlflow_version")?,
    })
}

// ------------------------------------------------------------------------------------------------
// Pre-parse guard: a model of libyaml's scanner that over-approximates its flow depth.
// ------------------------------------------------------------------------------------------------

/// Where a scan is inside the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between tokens: the next character that is not blank, a break or a comment starts one.
    Tok,
    /// Inside a comment or a directive line, until a line break.
    Comment,
    /// Inside the non-blank run of a plain scalar.
    Plain,
    /// In blanks after a plain scalar's run, on the same line: the scalar may go on.
    PlainGap,
    /// In blanks and breaks after a plain scalar's run, past a line break.
    PlainGapNl,
    /// Inside a single-quoted scalar.
    Single,
    /// Inside a double-quoted scalar.
    Double,
    /// Right after a backslash in a double-quoted scalar.
    DoubleEscape,
    /// Inside the name of an anchor or alias.
    Anchor,
    /// Inside a tag.
    Tag,
    /// Inside a verbatim tag `!<...>`.
    TagVerbatim,
    /// On the header line of a block scalar (`|` or `>`).
    BlockHeader,
    /// Inside the content lines of a block scalar.
    BlockBody,
}

/// One interpretation of the text so far: libyaml's scanner state as far as it matters here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lex {
    mode: Mode,
    /// Flow nesting level (`[` / `{` not yet closed).
    depth: u8,
    /// Characters still to be consumed by the current token (document markers, `''`, `!<`).
    skip: u8,
}

impl Lex {
    fn new(mode: Mode, depth: u8) -> Lex {
        Lex {
            mode,
            depth,
            skip: 0,
        }
    }

    /// A dense number for de-duplication: 13 modes, skip <= 2, depth <= MAX_DEPTH.
    fn key(self) -> usize {
        (self.mode as usize) | (usize::from(self.skip) << 4) | (usize::from(self.depth) << 6)
    }
}

const LEX_KEYS: usize = 1 << 13;

/// The interpretations after the current character, de-duplicated.
struct NextLexes {
    list: Vec<Lex>,
    seen: Vec<u64>,
    alias: bool,
    too_deep: bool,
}

impl NextLexes {
    fn push(&mut self, lex: Lex) {
        let key = lex.key();
        let bit = 1u64 << (key % 64);
        if self.seen[key / 64] & bit == 0 {
            self.seen[key / 64] |= bit;
            self.list.push(lex);
        }
    }

    fn push_mode(&mut self, mode: Mode, depth: u8) {
        self.push(Lex::new(mode, depth));
    }
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// libyaml's line breaks: CR, LF, NEL, LS, PS.
fn is_break(c: char) -> bool {
    matches!(c, '\r' | '\n' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// Blank, break or end of input at `i`.
fn blankz_at(s: &[char], i: usize) -> bool {
    s.get(i).is_none_or(|&c| is_blank(c) || is_break(c))
}

/// libyaml's anchor characters.
fn is_anchor_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// libyaml's tag URI characters; `,[]` only inside a verbatim tag `!<...>`.
fn is_uri_char(c: char, verbatim: bool) -> bool {
    is_anchor_char(c)
        || ";/?:@&=+$.%!~*'()".contains(c)
        || (verbatim && matches!(c, ',' | '[' | ']'))
}

/// `---` or `...` followed by a blank, a break or the end (only meaningful at column 0).
fn is_document_marker(s: &[char], i: usize) -> bool {
    let marker = |m: char| s.get(i..i + 3).is_some_and(|w| w.iter().all(|&c| c == m));
    (marker('-') || marker('.')) && blankz_at(s, i + 3)
}

/// The token that starts at `s[i]` (libyaml's `yaml_parser_fetch_next_token` dispatch).
fn lex_token(depth: u8, s: &[char], i: usize, line_start: bool, out: &mut NextLexes) {
    let c = s[i];
    match c {
        ' ' | '\t' => out.push_mode(Mode::Tok, depth),
        c if is_break(c) => out.push_mode(Mode::Tok, depth),
        '\u{feff}' if line_start => out.push_mode(Mode::Tok, depth),
        '%' if line_start => out.push_mode(Mode::Comment, depth),
        '-' | '.' if line_start && is_document_marker(s, i) => out.push(Lex {
            mode: Mode::Tok,
            depth,
            skip: 2,
        }),
        '[' | '{' => {
            if usize::from(depth) >= MAX_DEPTH {
                out.too_deep = true;
            } else {
                out.push_mode(Mode::Tok, depth + 1);
            }
        }
        ']' | '}' => out.push_mode(Mode::Tok, depth.saturating_sub(1)),
        ',' => out.push_mode(Mode::Tok, depth),
        '-' if blankz_at(s, i + 1) => out.push_mode(Mode::Tok, depth),
        '?' | ':' if depth > 0 || blankz_at(s, i + 1) => out.push_mode(Mode::Tok, depth),
        '*' => {
            out.alias = true;
            out.push_mode(Mode::Anchor, depth);
        }
        '&' => out.push_mode(Mode::Anchor, depth),
        '!' if s.get(i + 1) == Some(&'<') => out.push(Lex {
            mode: Mode::TagVerbatim,
            depth,
            skip: 1,
        }),
        '!' => out.push_mode(Mode::Tag, depth),
        '|' | '>' if depth == 0 => out.push_mode(Mode::BlockHeader, depth),
        '\'' => out.push_mode(Mode::Single, depth),
        '"' => out.push_mode(Mode::Double, depth),
        '#' => out.push_mode(Mode::Comment, depth),
        _ => out.push_mode(Mode::Plain, depth),
    }
}

/// One character of a plain scalar's run (libyaml's `yaml_parser_scan_plain_scalar` inner loop).
fn lex_plain(depth: u8, s: &[char], i: usize, line_start: bool, out: &mut NextLexes) {
    let c = s[i];
    let flow_stop = depth > 0
        && (matches!(c, ',' | '[' | ']' | '{' | '}')
            || (c == ':' && matches!(s.get(i + 1), Some(',' | '?' | '[' | ']' | '{' | '}'))));
    if (c == ':' && blankz_at(s, i + 1)) || flow_stop {
        lex_token(depth, s, i, line_start, out);
    } else if is_blank(c) {
        out.push_mode(Mode::PlainGap, depth);
    } else if is_break(c) {
        out.push_mode(Mode::PlainGapNl, depth);
    } else {
        out.push_mode(Mode::Plain, depth);
    }
}

fn lex_step(lex: Lex, s: &[char], i: usize, line_start: bool, out: &mut NextLexes) {
    if lex.skip > 0 {
        out.push(Lex {
            skip: lex.skip - 1,
            ..lex
        });
        return;
    }
    let c = s[i];
    let depth = lex.depth;
    match lex.mode {
        Mode::Tok => lex_token(depth, s, i, line_start, out),
        Mode::Comment => {
            if is_break(c) {
                out.push_mode(Mode::Tok, depth);
            } else {
                out.push(lex);
            }
        }
        Mode::Plain => lex_plain(depth, s, i, line_start, out),
        Mode::PlainGap | Mode::PlainGapNl => {
            if is_blank(c) {
                out.push(lex);
            } else if is_break(c) {
                out.push_mode(Mode::PlainGapNl, depth);
            } else {
                // In block context a plain scalar goes on past a line break only if the next line
                // is indented more than the enclosing block collection. That indentation is not
                // tracked here, so keep both readings.
                if lex.mode == Mode::PlainGapNl && depth == 0 {
                    lex_token(depth, s, i, line_start, out);
                }
                if (line_start && is_document_marker(s, i)) || c == '#' {
                    lex_token(depth, s, i, line_start, out);
                } else {
                    lex_plain(depth, s, i, line_start, out);
                }
            }
        }
        Mode::Single => {
            if c != '\'' {
                out.push(lex);
            } else if s.get(i + 1) == Some(&'\'') {
                out.push(Lex { skip: 1, ..lex });
            } else {
                out.push_mode(Mode::Tok, depth);
            }
        }
        Mode::Double => match c {
            '\\' => out.push_mode(Mode::DoubleEscape, depth),
            '"' => out.push_mode(Mode::Tok, depth),
            _ => out.push(lex),
        },
        Mode::DoubleEscape => out.push_mode(Mode::Double, depth),
        Mode::Anchor => {
            if is_anchor_char(c) {
                out.push(lex);
            } else {
                lex_token(depth, s, i, line_start, out);
            }
        }
        Mode::Tag => {
            if is_uri_char(c, false) {
                out.push(lex);
            } else {
                lex_token(depth, s, i, line_start, out);
            }
        }
        Mode::TagVerbatim => {
            if is_uri_char(c, true) {
                out.push(lex);
            } else if c == '>' {
                out.push_mode(Mode::Tok, depth);
            } else {
                lex_token(depth, s, i, line_start, out);
            }
        }
        Mode::BlockHeader => {
            if is_break(c) {
                out.push_mode(Mode::BlockBody, depth);
            } else {
                out.push(lex);
            }
        }
        Mode::BlockBody => {
            // A block scalar's content is indented at least one column, so a line starting with
            // a non-blank character ends it; an indented line may end it or not.
            if line_start {
                lex_token(depth, s, i, line_start, out);
                if !is_blank(c) && !is_break(c) {
                    return;
                }
            }
            out.push(lex);
        }
    }
}

/// Reject, before parsing, documents that would make libyaml or `serde_yaml` do too much work:
/// flow nesting deeper than [`MAX_DEPTH`] or more than [`MAX_ALIASES`] alias uses.
///
/// The scan follows libyaml's scanner rules for tokens, quoted scalars, comments, plain scalars,
/// tags, anchors and block scalars. The two decisions that depend on block indentation (does a
/// plain scalar go on past a line break, does a block scalar end) are not tracked; the scan
/// keeps every reading instead and rejects if any of them goes too deep. So the flow depth it
/// reports is never less than libyaml's, and a document cannot hide brackets from it behind
/// quotes that libyaml does not see.
fn prescan(text: &str) -> Result<(), Invalid> {
    let s: Vec<char> = text.chars().collect();
    let mut current = vec![Lex::new(Mode::Tok, 0)];
    let mut next = NextLexes {
        list: Vec::with_capacity(MAX_SCAN_STATES * 2),
        seen: vec![0; LEX_KEYS / 64],
        alias: false,
        too_deep: false,
    };
    let mut aliases = 0usize;
    let line_of = |i: usize| 1 + s[..i].iter().filter(|&&c| c == '\n').count();
    for i in 0..s.len() {
        let line_start = i == 0 || is_break(s[i - 1]);
        for &lex in &current {
            lex_step(lex, &s, i, line_start, &mut next);
        }
        if next.too_deep {
            return invalid(format!(
                "MLmodel nests YAML flow collections deeper than {MAX_DEPTH} levels (line {})",
                line_of(i)
            ));
        }
        if next.alias {
            aliases += 1;
            if aliases > MAX_ALIASES {
                return invalid(format!(
                    "MLmodel uses more than {MAX_ALIASES} YAML aliases (line {})",
                    line_of(i)
                ));
            }
        }
        if next.list.len() > MAX_SCAN_STATES {
            return invalid(format!(
                "MLmodel is too irregular to check safely before parsing (line {})",
                line_of(i)
            ));
        }
        std::mem::swap(&mut current, &mut next.list);
        next.list.clear();
        for lex in &current {
            next.seen[lex.key() / 64] = 0;
        }
        next.alias = false;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Budgeted YAML tree building.
// ------------------------------------------------------------------------------------------------

/// Limits on what the parsed document may expand to, shared by every node visitor.
struct Budget {
    max_nodes: usize,
    nodes_left: Cell<usize>,
    bytes_left: Cell<usize>,
    /// The limit or rule that stopped parsing, reported instead of the parser's wording.
    failure: RefCell<Option<String>>,
}

impl Budget {
    /// Without aliases a document has at most about one node and one scalar byte per input byte,
    /// so these limits only ever stop alias expansion.
    fn for_input(len: usize) -> Budget {
        let max_nodes = len.saturating_mul(4).saturating_add(10_000).min(1_100_000);
        Budget {
            max_nodes,
            nodes_left: Cell::new(max_nodes),
            bytes_left: Cell::new(len.saturating_mul(4).saturating_add(1 << 16)),
            failure: RefCell::new(None),
        }
    }

    fn fail<E: de::Error>(&self, message: String) -> E {
        let mut failure = self.failure.borrow_mut();
        if failure.is_none() {
            *failure = Some(message.clone());
        }
        E::custom(message)
    }

    fn node<E: de::Error>(&self) -> Result<(), E> {
        match self.nodes_left.get().checked_sub(1) {
            Some(left) => {
                self.nodes_left.set(left);
                Ok(())
            }
            None => Err(self.fail(format!(
                "MLmodel expands to more than {} YAML nodes (YAML aliases repeat too much)",
                self.max_nodes
            ))),
        }
    }

    fn scalar<E: de::Error>(&self, len: usize) -> Result<(), E> {
        self.node()?;
        match self.bytes_left.get().checked_sub(len) {
            Some(left) => {
                self.bytes_left.set(left);
                Ok(())
            }
            None => Err(self.fail(
                "MLmodel expands to too much scalar text (YAML aliases repeat too much)"
                    .to_string(),
            )),
        }
    }
}

/// Builds one YAML node, counting it against the budget.
#[derive(Clone, Copy)]
struct NodeSeed<'b> {
    budget: &'b Budget,
    depth: usize,
}

impl NodeSeed<'_> {
    fn child(self) -> Self {
        NodeSeed {
            depth: self.depth + 1,
            ..self
        }
    }

    fn collection<E: de::Error>(self) -> Result<(), E> {
        self.budget.node()?;
        if self.depth > MAX_DEPTH {
            return Err(self.budget.fail(format!(
                "MLmodel nests YAML collections deeper than {MAX_DEPTH} levels"
            )));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = Yaml;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Yaml, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NodeSeed<'_> {
    type Value = Yaml;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Yaml, E> {
        self.budget.node()?;
        Ok(Yaml::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Yaml, E> {
        self.budget.node()?;
        Ok(Yaml::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Yaml, E> {
        self.budget.node()?;
        Ok(Yaml::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Yaml, E> {
        self.visit_string(v.to_string())
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Yaml, E> {
        self.visit_string(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Yaml, E> {
        self.budget.node()?;
        Ok(Yaml::Number(v.into()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Yaml, E> {
        self.budget.scalar(v.len())?;
        Ok(Yaml::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Yaml, E> {
        self.budget.scalar(v.len())?;
        Ok(Yaml::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Yaml, E> {
        self.budget.node()?;
        Ok(Yaml::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Yaml, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Yaml, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Yaml, A::Error> {
        self.collection()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.child())? {
            items.push(item);
        }
        Ok(Yaml::Sequence(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Yaml, A::Error> {
        self.collection()?;
        let mut entries = Mapping::new();
        while let Some(key) = map.next_key_seed(self.child())? {
            if entries.contains_key(&key) {
                return Err(self.budget.fail(format!(
                    "MLmodel has a duplicate key {}",
                    describe_key(&key)
                )));
            }
            let value = map.next_value_seed(self.child())?;
            entries.insert(key, value);
        }
        Ok(Yaml::Mapping(entries))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Yaml, A::Error> {
        // serde_yaml presents a value with a local tag (`!foo value`) as an enum variant.
        let (tag, _variant): (String, A::Variant) = data.variant()?;
        Err(self.budget.fail(format!(
            "MLmodel uses the YAML tag !{tag}, which MLflow never writes"
        )))
    }
}

/// Parse the (pre-scanned) text into a YAML tree within the budget.
fn parse(text: &str) -> Result<Yaml, Invalid> {
    let budget = Budget::for_input(text.len());
    let seed = NodeSeed {
        budget: &budget,
        depth: 1,
    };
    match seed.deserialize(serde_yaml::Deserializer::from_str(text)) {
        Ok(value) => Ok(value),
        Err(err) => {
            let location = err
                .location()
                .map(|l| format!(" (line {})", l.line()))
                .unwrap_or_default();
            if let Some(message) = budget.failure.take() {
                return invalid(format!("{message}{location}"));
            }
            let message = err.to_string();
            if message.starts_with("repetition limit exceeded") {
                return invalid(format!("MLmodel expands YAML aliases too much ({message})"));
            }
            invalid(format!("MLmodel is not valid YAML: {message}"))
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Structure checks.
// ------------------------------------------------------------------------------------------------

fn kind(value: &Yaml) -> &'static str {
    match value {
        Yaml::Null => "null",
        Yaml::Bool(_) => "boolean",
        Yaml::Number(_) => "number",
        Yaml::String(_) => "string",
        Yaml::Sequence(_) => "sequence",
        Yaml::Mapping(_) => "mapping",
        Yaml::Tagged(_) => "tagged value",
    }
}

fn with_article(word: &str) -> String {
    match word {
        "null" => "null".to_string(),
        w if w.starts_with(['a', 'e', 'i', 'o', 'u']) => format!("an {w}"),
        w => format!("a {w}"),
    }
}

fn describe_key(key: &Yaml) -> String {
    match key {
        Yaml::String(s) => format!("{s:?}"),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => format!("({})", with_article(kind(other))),
    }
}

/// Keys of a flavor that name a path inside the model directory, for every flavor.
const FLAVOR_PATH_KEYS: [&str; 10] = [
    "model_path",
    "data",
    "code",
    "python_model",
    "pickled_model",
    "model_data",
    "saved_model_dir",
    "model_file",
    "state_dict",
    "path",
];

/// Keys whose meaning MLflow fixes, so a value that is neither null nor a string is an error
/// rather than some other flavor's unrelated setting.
fn path_key_is_strict(flavor: &str, key: &str) -> bool {
    matches!(
        (flavor, key),
        (
            "python_function",
            "model_path" | "data" | "code" | "python_model" | "artifacts" | "env"
        ) | ("sklearn", "pickled_model" | "code")
    )
}

fn check_flavors(
    root: &Mapping,
    lookup: &dyn Fn(&str) -> PathKind,
) -> Result<Vec<String>, Invalid> {
    let flavors = match root.get("flavors") {
        None => return invalid("MLmodel has no flavors"),
        Some(Yaml::Null) => return invalid("MLmodel has no flavors (flavors is null)"),
        Some(Yaml::Mapping(map)) if map.is_empty() => {
            return invalid("MLmodel has no flavors (flavors is empty)");
        }
        Some(Yaml::Mapping(map)) => map,
        Some(other) => {
            return invalid(format!(
                "MLmodel has no flavors (flavors is {}, not a mapping)",
                with_article(kind(other))
            ));
        }
    };
    let mut names = Vec::with_capacity(flavors.len());
    for (key, settings) in flavors {
        let Yaml::String(name) = key else {
            return invalid(format!(
                "MLmodel flavors has a key that is not a string: {}",
                describe_key(key)
            ));
        };
        let Yaml::Mapping(settings) = settings else {
            return invalid(format!(
                "flavor {name}: expected a mapping of settings, found {}",
                with_article(kind(settings))
            ));
        };
        check_flavor_paths(name, settings, lookup)?;
        names.push(name.clone());
    }
    names.sort();
    Ok(names)
}

fn check_flavor_paths(
    flavor: &str,
    settings: &Mapping,
    lookup: &dyn Fn(&str) -> PathKind,
) -> Result<(), Invalid> {
    let context = format!("flavor {flavor}");
    for key in FLAVOR_PATH_KEYS {
        let strict = path_key_is_strict(flavor, key);
        check_optional_path(&context, key, settings.get(key), strict, lookup)?;
    }

    let artifacts_strict = path_key_is_strict(flavor, "artifacts");
    match settings.get("artifacts") {
        None | Some(Yaml::Null) => {}
        Some(Yaml::Mapping(artifacts)) => {
            for (name, artifact) in artifacts {
                let name = match name {
                    Yaml::String(s) => s.clone(),
                    other => describe_key(other),
                };
                match artifact {
                    Yaml::Mapping(artifact) => {
                        let key = format!("artifacts.{name}.path");
                        let value = artifact.get("path");
                        check_optional_path(&context, &key, value, artifacts_strict, lookup)?;
                    }
                    other if artifacts_strict => {
                        return invalid(format!(
                            "{context}: artifacts.{name} must be a mapping, found {}",
                            with_article(kind(other))
                        ));
                    }
                    _ => {}
                }
            }
        }
        Some(other) if artifacts_strict => {
            return invalid(format!(
                "{context}: artifacts must be a mapping, found {}",
                with_article(kind(other))
            ));
        }
        Some(_) => {}
    }

    if flavor == "python_function" {
        match settings.get("env") {
            None | Some(Yaml::Null) => {}
            Some(Yaml::String(path)) => check_path(&context, "env", path, lookup)?,
            Some(Yaml::Mapping(env)) => {
                for key in ["conda", "virtualenv"] {
                    let name = format!("env.{key}");
                    check_optional_path(&context, &name, env.get(key), true, lookup)?;
                }
            }
            Some(other) => {
                return invalid(format!(
                    "{context}: env must be a path or a mapping, found {}",
                    with_article(kind(other))
                ));
            }
        }
    }
    Ok(())
}

fn check_input_example(root: &Mapping, lookup: &dyn Fn(&str) -> PathKind) -> Result<(), Invalid> {
    const CONTEXT: &str = "saved_input_example_info";
    match root.get(CONTEXT) {
        None | Some(Yaml::Null) => Ok(()),
        Some(Yaml::Mapping(info)) => {
            for key in ["artifact_path", "serving_input_path"] {
                check_optional_path(CONTEXT, key, info.get(key), true, lookup)?;
            }
            Ok(())
        }
        Some(other) => invalid(format!(
            "{CONTEXT} is {}, not a mapping",
            with_article(kind(other))
        )),
    }
}

/// Check `value` (the value of `key`) if it is a string; `strict` makes other non-null values
/// an error instead of being ignored.
fn check_optional_path(
    context: &str,
    key: &str,
    value: Option<&Yaml>,
    strict: bool,
    lookup: &dyn Fn(&str) -> PathKind,
) -> Result<(), Invalid> {
    match value {
        None | Some(Yaml::Null) => Ok(()),
        Some(Yaml::String(path)) => check_path(context, key, path, lookup),
        Some(other) if strict => invalid(format!(
            "{context}: {key} must be a path, found {}",
            with_article(kind(other))
        )),
        Some(_) => Ok(()),
    }
}

/// Why a path named by MLmodel cannot be looked up.
#[derive(Debug, PartialEq, Eq)]
enum BadPath {
    Empty,
    Nul,
    Outside,
}

/// Normalise a relative path: drop empty and `.` components. Absolute paths and `..`
/// components are refused outright, even where `..` would stay inside the directory. An empty
/// result (such as `.`) means the model directory itself.
fn normalize_path(path: &str) -> Result<String, BadPath> {
    if path.is_empty() {
        return Err(BadPath::Empty);
    }
    if path.contains('\0') {
        return Err(BadPath::Nul);
    }
    if path.starts_with('/') {
        return Err(BadPath::Outside);
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(BadPath::Outside),
            part => parts.push(part),
        }
    }
    Ok(parts.join("/"))
}

fn check_path(
    context: &str,
    key: &str,
    path: &str,
    lookup: &dyn Fn(&str) -> PathKind,
) -> Result<(), Invalid> {
    let normalized = match normalize_path(path) {
        Ok(normalized) => normalized,
        Err(BadPath::Empty) => return invalid(format!("{context}: {key} is an empty path")),
        Err(BadPath::Nul) => {
            return invalid(format!("{context}: {key} contains a NUL character"));
        }
        Err(BadPath::Outside) => {
            return invalid(format!(
                "{context}: {key} names {path}, which points outside the model directory"
            ));
        }
    };
    if normalized.is_empty() {
        return Ok(()); // the model directory itself
    }
    match lookup(&normalized) {
        PathKind::File | PathKind::Dir => Ok(()),
        PathKind::Missing => invalid(format!(
            "{context}: {key} names {path}, which does not exist"
        )),
    }
}

/// A top-level scalar as text: null is `None`, numbers and booleans in their YAML form.
fn scalar_field(root: &Mapping, key: &str) -> Result<Option<String>, Invalid> {
    match root.get(key) {
        None | Some(Yaml::Null) => Ok(None),
        Some(Yaml::String(s)) => Ok(Some(s.clone())),
        Some(Yaml::Bool(b)) => Ok(Some(b.to_string())),
        Some(Yaml::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => invalid(format!(
            "MLmodel {key} must be a scalar, found {}",
            with_article(kind(other))
        )),
    }
}

// ------------------------------------------------------------------------------------------------
// Signature checks (mlflow.types.schema, as of MLflow 3).
// ------------------------------------------------------------------------------------------------

/// `mlflow.types.DataType` names.
const DATA_TYPES: [&str; 8] = [
    "boolean", "integer", "long", "float", "double", "string", "binary", "datetime",
];

/// Validate the `signature` mapping and return the JSON text recorded in [`ModelInfo`].
fn check_signature(root: &Mapping) -> Result<Option<String>, Invalid> {
    let signature = match root.get("signature") {
        None | Some(Yaml::Null) => return Ok(None),
        Some(Yaml::Mapping(signature)) => signature,
        Some(other) => {
            return invalid(format!(
                "signature is {}, not a mapping",
                with_article(kind(other))
            ));
        }
    };
    let mut parts = JsonMap::new();
    for part in ["inputs", "outputs", "params"] {
        let context = format!("signature.{part}");
        let text = match signature.get(part) {
            None | Some(Yaml::Null) => continue,
            Some(Yaml::String(text)) => text,
            Some(other) => {
                return invalid(format!(
                    "{context} must be a string holding JSON, found {}",
                    with_article(kind(other))
                ));
            }
        };
        let list = match serde_json::from_str::<Json>(text) {
            Ok(Json::Array(list)) => list,
            Ok(_) => return invalid(format!("{context} is not a JSON list")),
            Err(err) => return invalid(format!("{context} is not valid JSON: {err}")),
        };
        if part == "params" {
            check_params(&context, &list)?;
        } else {
            check_schema(&context, &list)?;
        }
        parts.insert(part.to_string(), Json::Array(list));
    }
    if parts.is_empty() {
        return Ok(None);
    }
    Ok(Some(Json::Object(parts).to_string()))
}

/// `Schema.from_json`: a non-empty list of column specs or of tensor specs.
fn check_schema(context: &str, list: &[Json]) -> Result<(), Invalid> {
    if list.is_empty() {
        return invalid(format!("{context} is an empty list"));
    }
    let (mut tensors, mut named, mut unnamed, mut unnamed_optional) = (0, 0, 0, false);
    for (i, spec) in list.iter().enumerate() {
        let here = format!("{context}[{i}]");
        let Json::Object(spec) = spec else {
            return invalid(format!("{here} is not a JSON object"));
        };
        let has_name = match spec.get("name") {
            None | Some(Json::Null) => false,
            Some(Json::String(_)) => true,
            Some(_) => return invalid(format!("{here}: name must be a string")),
        };
        let ty = type_name(&here, spec)?;
        if ty == "tensor" {
            check_tensor_spec(&here, spec)?;
            tensors += 1;
        } else {
            check_type(&here, ty, spec, 0)?;
            if check_required(&here, spec)? == Some(false) && !has_name {
                unnamed_optional = true;
            }
        }
        if has_name {
            named += 1;
        } else {
            unnamed += 1;
        }
    }
    if tensors > 0 && tensors < list.len() {
        return invalid(format!("{context} mixes tensor specs and column specs"));
    }
    if named > 0 && unnamed > 0 {
        return invalid(format!("{context} mixes named and unnamed entries"));
    }
    if tensors > 1 && unnamed > 0 {
        return invalid(format!("{context} has several unnamed tensor specs"));
    }
    if unnamed_optional {
        return invalid(format!("{context} has an unnamed optional column"));
    }
    Ok(())
}

fn type_name<'j>(here: &str, spec: &'j JsonMap<String, Json>) -> Result<&'j str, Invalid> {
    match spec.get("type") {
        Some(Json::String(ty)) => Ok(ty),
        None | Some(Json::Null) => invalid(format!("{here} has no type")),
        Some(_) => invalid(format!("{here}: type must be a string")),
    }
}

fn check_required(here: &str, spec: &JsonMap<String, Json>) -> Result<Option<bool>, Invalid> {
    match spec.get("required") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Bool(required)) => Ok(Some(*required)),
        Some(_) => invalid(format!("{here}: required must be true or false")),
    }
}

/// A column, array item, map value or object property type.
fn check_type(
    here: &str,
    ty: &str,
    spec: &JsonMap<String, Json>,
    depth: usize,
) -> Result<(), Invalid> {
    if depth > MAX_TYPE_DEPTH {
        return invalid(format!(
            "{here}: types nest deeper than {MAX_TYPE_DEPTH} levels"
        ));
    }
    match ty {
        t if DATA_TYPES.contains(&t) => Ok(()),
        "any" | "sparkml_vector" => Ok(()),
        "array" => {
            let items = nested_spec(here, spec, "items", "array")?;
            let here = format!("{here}.items");
            check_type(&here, type_name(&here, items)?, items, depth + 1)
        }
        "map" => {
            let values = nested_spec(here, spec, "values", "map")?;
            let here = format!("{here}.values");
            check_type(&here, type_name(&here, values)?, values, depth + 1)
        }
        "object" => {
            let properties = match spec.get("properties") {
                Some(Json::Object(properties)) if !properties.is_empty() => properties,
                Some(Json::Object(_)) => {
                    return invalid(format!("{here}: object type has no properties"));
                }
                None | Some(Json::Null) => {
                    return invalid(format!("{here}: object type has no properties"));
                }
                Some(_) => return invalid(format!("{here}: properties must be a JSON object")),
            };
            for (name, property) in properties {
                let here = format!("{here}.properties.{name}");
                let Json::Object(property) = property else {
                    return invalid(format!("{here} is not a JSON object"));
                };
                check_type(&here, type_name(&here, property)?, property, depth + 1)?;
                check_required(&here, property)?;
            }
            Ok(())
        }
        other => invalid(format!("{here} has unknown type {other:?}")),
    }
}

fn nested_spec<'j>(
    here: &str,
    spec: &'j JsonMap<String, Json>,
    key: &str,
    ty: &str,
) -> Result<&'j JsonMap<String, Json>, Invalid> {
    match spec.get(key) {
        Some(Json::Object(nested)) => Ok(nested),
        None | Some(Json::Null) => invalid(format!("{here}: {ty} type has no {key}")),
        Some(_) => invalid(format!("{here}: {key} must be a JSON object")),
    }
}

fn check_tensor_spec(here: &str, spec: &JsonMap<String, Json>) -> Result<(), Invalid> {
    let tensor = match spec.get("tensor-spec") {
        Some(Json::Object(tensor)) => tensor,
        None | Some(Json::Null) => return invalid(format!("{here}: tensor has no tensor-spec")),
        Some(_) => return invalid(format!("{here}: tensor-spec must be a JSON object")),
    };
    match tensor.get("dtype") {
        Some(Json::String(dtype)) if is_numpy_dtype(dtype) => {}
        Some(Json::String(dtype)) => {
            return invalid(format!("{here}: tensor-spec has unknown dtype {dtype:?}"));
        }
        None | Some(Json::Null) => return invalid(format!("{here}: tensor-spec has no dtype")),
        Some(_) => return invalid(format!("{here}: tensor-spec dtype must be a string")),
    }
    match tensor.get("shape") {
        Some(Json::Array(shape)) if shape.iter().all(|d| d.as_i64().is_some_and(|d| d >= -1)) => {}
        None | Some(Json::Null) => return invalid(format!("{here}: tensor-spec has no shape")),
        Some(_) => {
            return invalid(format!(
                "{here}: tensor-spec shape must be a list of integers (-1 for any size)"
            ));
        }
    }
    Ok(())
}

/// `numpy.dtype(...).name` values that MLflow writes (sized flexible types such as `str320`
/// are refused by MLflow itself).
fn is_numpy_dtype(dtype: &str) -> bool {
    const NAMES: [&str; 21] = [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "float128",
        "complex64",
        "complex128",
        "complex256",
        "str",
        "bytes",
        "object",
        "void",
        "datetime64",
    ];
    const UNITS: [&str; 14] = [
        "Y", "M", "W", "D", "h", "m", "s", "ms", "us", "μs", "ns", "ps", "fs", "as",
    ];
    if NAMES.contains(&dtype) || dtype == "timedelta64" {
        return true;
    }
    ["datetime64", "timedelta64"].iter().any(|base| {
        dtype
            .strip_prefix(base)
            .and_then(|rest| rest.strip_prefix('['))
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|unit| {
                let unit = unit.trim_start_matches(|c: char| c.is_ascii_digit());
                UNITS.contains(&unit)
            })
    })
}

/// `ParamSchema.from_json`: a list of `{"name", "type" (or "dtype"), "default", "shape"}`.
fn check_params(context: &str, list: &[Json]) -> Result<(), Invalid> {
    let mut names = HashSet::new();
    for (i, spec) in list.iter().enumerate() {
        let here = format!("{context}[{i}]");
        let Json::Object(spec) = spec else {
            return invalid(format!("{here} is not a JSON object"));
        };
        let name = match spec.get("name") {
            Some(Json::String(name)) => name,
            None | Some(Json::Null) => return invalid(format!("{here} has no name")),
            Some(_) => return invalid(format!("{here}: name must be a string")),
        };
        if !names.insert(name.as_str()) {
            return invalid(format!("{context} has duplicate parameter {name:?}"));
        }
        let ty = match spec.get("type").or_else(|| spec.get("dtype")) {
            Some(Json::String(ty)) => ty.as_str(),
            None | Some(Json::Null) => return invalid(format!("{here} has no type")),
            Some(_) => return invalid(format!("{here}: type must be a string")),
        };
        match ty {
            "binary" => return invalid(format!("{here}: binary is not allowed for parameters")),
            "object" => check_type(&here, ty, spec, 0)?,
            t if DATA_TYPES.contains(&t) => {}
            other => return invalid(format!("{here} has unknown type {other:?}")),
        }
        let Some(default) = spec.get("default") else {
            return invalid(format!("{here} has no default"));
        };
        match spec.get("shape") {
            None | Some(Json::Null) => {}
            Some(Json::Array(shape)) if shape.len() == 1 && shape[0].as_i64() == Some(-1) => {
                if !default.is_array() {
                    return invalid(format!("{here}: default must be a list when shape is [-1]"));
                }
            }
            Some(_) => return invalid(format!("{here}: shape must be null or [-1]")),
        }
    }
    Ok(())
}
