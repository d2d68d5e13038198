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
//! 1. Before the YAML parser sees anything, `prescan` walks the raw text with a small
//!    over-approximating model of libyaml's scanner and rejects flow nesting (`[`/`{`) deeper than
//!    64 levels and more than 64 alias uses. This matters: libyaml (under
//!    `serde_yaml` 0.9) spends time quadratic in the flow depth while scanning (measured: 100,000
//!    levels of `{a: ` take 48 s in a release build), long before `serde_yaml`'s own recursion
//!    limit of 128 applies.
//! 2. While the parsed events are turned into a tree, a budgeted visitor caps the nesting depth,
//!    the number of nodes and the scalar bytes, counting every node an alias expands to.
//!    `serde_yaml`'s own "repetition limit" stops exponential alias bombs but not quadratic ones
//!    (a 15 KB document of one anchored 3,000-item list aliased 3,000 times expands to 9 million
//!    nodes and 1 GB of memory), so the budget (proportional to the input size, at most 250,000
//!    nodes) is what bounds memory.

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
    /// The `python_function` flavor's virtualenv file (normally `python_env.yaml`), normalised;
    /// its requirement files are checked by [`check_python_env`].
    pub python_env: Option<String>,
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
    let root = load_mapping(bytes, MLMODEL_FILE_NAME)?;
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
        python_env: python_env_path(&root),
    })
}

/// Size, encoding, the guarded parse and a mapping at the top: what `MLmodel` and
/// `python_env.yaml` share. Messages start with `file`'s name.
fn load_mapping(bytes: &[u8], file: &str) -> Result<Mapping, Invalid> {
    if bytes.len() > MAX_MLMODEL_BYTES {
        return invalid(format!(
            "{file} is {} bytes, more than the limit of {MAX_MLMODEL_BYTES} bytes",
            bytes.len()
        ));
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => {
            return invalid(format!(
                "{file} is not valid UTF-8 (bad byte at offset {})",
                err.valid_up_to()
            ));
        }
    };
    // libyaml drops one leading byte order mark; do the same so the pre-scan sees what it sees.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return invalid(format!("{file} is empty"));
    }
    // The guards and the parser word their findings without a subject.
    let named = |e: Invalid| Invalid(format!("{file} {}", e.0));
    prescan(text).map_err(named)?;
    match parse(text).map_err(named)? {
        Yaml::Mapping(map) => Ok(map),
        Yaml::Null => invalid(format!("{file} is empty (it holds no YAML value)")),
        other => invalid(format!(
            "{file} is {}, not a mapping",
            with_article(kind(&other))
        )),
    }
}

/// `flavors.python_function.env.virtualenv`, normalised, when it is a usable path.
fn python_env_path(root: &Mapping) -> Option<String> {
    let env = root
        .get("flavors")?
        .as_mapping()?
        .get("python_function")?
        .as_mapping()?
        .get("env")?
        .as_mapping()?;
    normalize_path(env.get("virtualenv")?.as_str()?)
        .ok()
        .filter(|p| !p.is_empty())
}

/// Checks a model's `python_env.yaml` (its bytes; `env_path` is where it is in the model
/// directory): a YAML mapping whose `dependencies` are pip arguments, and every requirement or
/// constraint file they name (`-r requirements.txt`, which MLflow always writes) exists in the
/// model directory, relative to the file itself, as pip resolves it when MLflow builds the
/// model's environment.
pub fn check_python_env(
    bytes: &[u8],
    env_path: &str,
    lookup: &dyn Fn(&str) -> PathKind,
) -> Result<(), Invalid> {
    let root = load_mapping(bytes, env_path)?;
    let deps = match root.get("dependencies") {
        None | Some(Yaml::Null) => return Ok(()),
        Some(Yaml::Sequence(deps)) => deps,
        Some(other) => {
            return invalid(format!(
                "{env_path}: dependencies must be a list, found {}",
                with_article(kind(other))
            ));
        }
    };
    let base = env_path.rsplit_once('/').map_or("", |(dir, _)| dir);
    for dep in deps {
        let Some(dep) = dep.as_str() else {
            return invalid(format!(
                "{env_path}: dependencies must be strings, found {}",
                with_article(kind(dep))
            ));
        };
        let Some((option, file)) = requirement_file(dep) else {
            continue;
        };
        if file.is_empty() {
            return invalid(format!("{env_path}: {option} names no file"));
        }
        let rel = if base.is_empty() || file.starts_with('/') {
            file.to_string()
        } else {
            format!("{base}/{file}")
        };
        check_path(env_path, option, &rel, lookup)?;
    }
    Ok(())
}

/// The file of a pip argument that reads one (`-r F`, `-rF`, `--requirement F`,
/// `--requirement=F`, and the same for `-c` / `--constraint`): `(option, file)`.
fn requirement_file(dep: &str) -> Option<(&'static str, &str)> {
    let dep = dep.trim();
    for (short, long) in [("-r", "--requirement"), ("-c", "--constraint")] {
        let rest = if let Some(rest) = dep.strip_prefix(long) {
            if !(rest.is_empty() || rest.starts_with('=') || rest.starts_with([' ', '\t'])) {
                continue;
            }
            rest.strip_prefix('=').unwrap_or(rest)
        } else if let Some(rest) = dep.strip_prefix(short) {
            rest
        } else {
            continue;
        };
        return Some((short, rest.trim()));
    }
    None
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
    /// On the header line of a block scalar with an explicit indentation (`|2`).
    BlockHeaderExplicit,
    /// In a block scalar before its first non-empty line, which sets the indentation.
    BlockBody,
    /// In a block scalar whose content lines are indented by `Lex::indent` spaces.
    BlockBodyKnown,
    /// In a block scalar with an explicit indentation relative to an unknown parent.
    BlockBodyExplicit,
}

/// One interpretation of the text so far: libyaml's scanner state as far as it matters here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lex {
    mode: Mode,
    /// Flow nesting level (`[` / `{` not yet closed).
    depth: u8,
    /// Characters still to be consumed by the current token (document markers, `''`, `!<`).
    skip: u8,
    /// Content indentation of a block scalar (`Mode::BlockBodyKnown` only).
    indent: u32,
}

impl Lex {
    fn new(mode: Mode, depth: u8) -> Lex {
        Lex {
            mode,
            depth,
            skip: 0,
            indent: 0,
        }
    }

    /// A dense number for de-duplication (without `indent`): 16 modes, skip <= 2,
    /// depth <= MAX_DEPTH.
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
        if lex.indent != 0 {
            // Rare (block scalars only), so a linear search is fine.
            if !self.list.contains(&lex) {
                self.list.push(lex);
            }
            return;
        }
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
            skip: 2,
            ..Lex::new(Mode::Tok, depth)
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
            skip: 1,
            ..Lex::new(Mode::TagVerbatim, depth)
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
        Mode::BlockHeader | Mode::BlockHeaderExplicit => {
            if is_break(c) {
                let explicit = lex.mode == Mode::BlockHeaderExplicit;
                let body = if explicit {
                    Mode::BlockBodyExplicit
                } else {
                    Mode::BlockBody
                };
                out.push_mode(body, depth);
            } else if matches!(c, '1'..='9') {
                out.push_mode(Mode::BlockHeaderExplicit, depth);
            } else {
                out.push(lex);
            }
        }
        Mode::BlockBody | Mode::BlockBodyKnown | Mode::BlockBodyExplicit => {
            lex_block_line(lex, s, i, line_start, out);
        }
    }
}

/// One character of a block scalar's content (libyaml's `yaml_parser_scan_block_scalar`).
///
/// Content is indented at least one column, so a line starting with a non-blank character ends
/// the scalar. Otherwise the indentation is that of the first non-empty line, unless that line is
/// not indented more than the enclosing block collection (unknown here: the scalar may end
/// there) or the header gives the indentation explicitly (unknown too: every indented line may
/// end the scalar).
fn lex_block_line(lex: Lex, s: &[char], i: usize, line_start: bool, out: &mut NextLexes) {
    if !line_start {
        out.push(lex);
        return;
    }
    let spaces = s[i..].iter().take_while(|&&c| c == ' ').count();
    let blank_line = s.get(i + spaces).is_none_or(|&c| is_break(c));
    if blank_line {
        out.push(lex);
        return;
    }
    let column = u32::try_from(spaces).unwrap_or(u32::MAX);
    let ends = match lex.mode {
        Mode::BlockBodyKnown => column < lex.indent,
        _ => spaces == 0,
    };
    if ends {
        lex_token(lex.depth, s, i, line_start, out);
        return;
    }
    match lex.mode {
        Mode::BlockBody => {
            lex_token(lex.depth, s, i, line_start, out);
            out.push(Lex {
                mode: Mode::BlockBodyKnown,
                indent: column,
                ..lex
            });
        }
        Mode::BlockBodyExplicit => {
            lex_token(lex.depth, s, i, line_start, out);
            out.push(lex);
        }
        _ => out.push(lex),
    }
}

/// With a single interpretation, the index of the next character that can change it (or
/// `None` if `s[i]` itself may): long scalars, comments and block scalar lines are skipped in
/// one go instead of one character at a time.
fn fast_forward(lex: Lex, s: &[char], i: usize) -> Option<usize> {
    if lex.skip > 0 {
        return None;
    }
    let rest = &s[i..];
    let stop = match lex.mode {
        Mode::Single => rest.iter().position(|&c| c == '\''),
        Mode::Double => rest.iter().position(|&c| c == '"' || c == '\\'),
        Mode::Comment => rest.iter().position(|&c| is_break(c)),
        Mode::Plain => rest.iter().position(|&c| {
            is_blank(c)
                || is_break(c)
                || c == ':'
                || (lex.depth > 0 && matches!(c, ',' | '[' | ']' | '{' | '}'))
        }),
        Mode::BlockBody | Mode::BlockBodyKnown | Mode::BlockBodyExplicit => {
            if i == 0 || is_break(s[i - 1]) {
                return None;
            }
            rest.iter().position(|&c| is_break(c)).map(|p| p + 1)
        }
        _ => return None,
    };
    let stop = i + stop.unwrap_or(rest.len());
    (stop > i).then_some(stop)
}

/// Reject, before parsing, documents that would make libyaml or `serde_yaml` do too much work:
/// flow nesting deeper than [`MAX_DEPTH`] or more than [`MAX_ALIASES`] alias uses.
///
/// The scan follows libyaml's scanner rules for tokens, quoted scalars, comments, plain scalars,
/// tags, anchors and block scalars. The two decisions that depend on block indentation (does a
/// plain scalar go on past a line break, does a block scalar end) are not tracked; the scan
/// keeps every reading instead and rejects if any of them goes too deep. So the flow depth it
/// reports is never less than libyaml's, and a document cannot hide brackets from it behind
/// quotes that libyaml does not see. The price is that brackets at the very start of a line
/// that continues a plain scalar or a block scalar count as flow collections too; PyYAML, which
/// writes `MLmodel`, never produces more than a couple of those.
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
    let mut i = 0;
    while i < s.len() {
        if let [only] = current[..]
            && let Some(next_i) = fast_forward(only, &s, i)
        {
            i = next_i;
            continue;
        }
        let line_start = i == 0 || is_break(s[i - 1]);
        for &lex in &current {
            lex_step(lex, &s, i, line_start, &mut next);
        }
        if next.too_deep {
            return invalid(format!(
                "nests YAML flow collections deeper than {MAX_DEPTH} levels (line {})",
                line_of(i)
            ));
        }
        if next.alias {
            aliases += 1;
            if aliases > MAX_ALIASES {
                return invalid(format!(
                    "uses more than {MAX_ALIASES} YAML aliases (line {})",
                    line_of(i)
                ));
            }
        }
        if next.list.len() > MAX_SCAN_STATES {
            return invalid(format!(
                "is too irregular to check safely before parsing (line {})",
                line_of(i)
            ));
        }
        std::mem::swap(&mut current, &mut next.list);
        next.list.clear();
        for lex in &current {
            next.seen[lex.key() / 64] = 0;
        }
        next.alias = false;
        i += 1;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Budgeted YAML tree building.
// ------------------------------------------------------------------------------------------------

/// Most YAML nodes (scalars and collections, counting alias expansions) in one document. Real
/// `MLmodel` files have well under a thousand.
const MAX_NODES: usize = 250_000;

/// Limits on what the parsed document may expand to, shared by every node visitor.
struct Budget {
    max_nodes: usize,
    nodes_left: Cell<usize>,
    bytes_left: Cell<usize>,
    /// The rule that stopped parsing and how to attach its line number, reported instead of
    /// the parser's wording.
    failure: RefCell<Option<(String, &'static str)>>,
}

impl Budget {
    /// Without aliases a document has at most about 1.5 nodes and one scalar byte per input
    /// byte, so below [`MAX_NODES`] these limits only ever stop alias expansion.
    fn for_input(len: usize) -> Budget {
        let max_nodes = len.saturating_mul(2).saturating_add(1_000).min(MAX_NODES);
        Budget {
            max_nodes,
            nodes_left: Cell::new(max_nodes),
            bytes_left: Cell::new(len.saturating_mul(2).saturating_add(1 << 16)),
            failure: RefCell::new(None),
        }
    }

    /// Record why parsing stops; `where_` introduces the line number of the node at fault.
    fn fail<E: de::Error>(&self, message: String, where_: &'static str) -> E {
        let mut failure = self.failure.borrow_mut();
        if failure.is_none() {
            *failure = Some((message.clone(), where_));
        }
        E::custom(message)
    }

    fn node<E: de::Error>(&self) -> Result<(), E> {
        match self.nodes_left.get().checked_sub(1) {
            Some(left) => {
                self.nodes_left.set(left);
                Ok(())
            }
            None => Err(self.fail(
                format!(
                    "expands to more than {} YAML nodes (too many values, or YAML \
                     aliases repeating too much)",
                    self.max_nodes
                ),
                " at line ",
            )),
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
                "expands to too much scalar text (YAML aliases repeating too much)".to_string(),
                " at line ",
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
            return Err(self.budget.fail(
                format!("nests YAML collections deeper than {MAX_DEPTH} levels"),
                " at line ",
            ));
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
                return Err(self.budget.fail(
                    format!("has a duplicate key {}", describe_key(&key)),
                    " in the mapping at line ",
                ));
            }
            let value = map.next_value_seed(self.child())?;
            entries.insert(key, value);
        }
        Ok(Yaml::Mapping(entries))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Yaml, A::Error> {
        // serde_yaml presents a value with a local tag (`!foo value`) as an enum variant.
        let (tag, _variant): (String, A::Variant) = data.variant()?;
        Err(self.budget.fail(
            format!("uses the YAML tag !{tag}, which MLflow never writes"),
            " at line ",
        ))
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
            if let Some((message, where_)) = budget.failure.take() {
                return match err.location() {
                    Some(location) => invalid(format!("{message}{where_}{}", location.line())),
                    None => invalid(message),
                };
            }
            let message = err.to_string();
            if message.starts_with("repetition limit exceeded") {
                return invalid(format!("expands YAML aliases too much ({message})"));
            }
            invalid(format!("is not valid YAML: {message}"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/mlflow")
            .join(name)
    }

    /// The value of a top-level `key: value` line of a fixture's MLmodel, read without YAML (the
    /// fixtures are regenerated by `tests/fixtures/mlflow/generate.sh`; nothing here pins them).
    fn top_level_value(name: &str, key: &str) -> String {
        let text = fs::read_to_string(fixture(name).join(MLMODEL_FILE_NAME)).unwrap();
        let prefix = format!("{key}: ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{name}/MLmodel has no {key}"))
            .to_string()
    }

    /// A `lookup` answering from a real directory on disk.
    fn dir_lookup(dir: &Path) -> impl Fn(&str) -> PathKind + '_ {
        move |rel: &str| {
            assert!(
                !rel.starts_with('/') && !rel.split('/').any(|p| p == ".."),
                "{rel}"
            );
            match fs::metadata(dir.join(rel)) {
                Ok(meta) if meta.is_dir() => PathKind::Dir,
                Ok(_) => PathKind::File,
                Err(_) => PathKind::Missing,
            }
        }
    }

    fn validate_fixture(name: &str) -> Result<ModelInfo, Invalid> {
        let dir = fixture(name);
        let bytes = fs::read(dir.join(MLMODEL_FILE_NAME)).expect("fixture MLmodel");
        validate(&bytes, &dir_lookup(&dir))
    }

    fn iris_text() -> String {
        fs::read_to_string(fixture("sklearn_iris").join(MLMODEL_FILE_NAME)).unwrap()
    }

    /// Files that exist in every hand-written test model.
    fn test_lookup(rel: &str) -> PathKind {
        assert!(
            !rel.starts_with('/') && !rel.split('/').any(|p| p == ".."),
            "{rel}"
        );
        match rel {
            "model.pkl"
            | "model.skops"
            | "conda.yaml"
            | "python_env.yaml"
            | "input_example.json"
            | "serving_input_example.json"
            | "requirements.txt"
            | "sub/model.pkl"
            | "MLmodel" => PathKind::File,
            "code" | "sub" | "data" => PathKind::Dir,
            _ => PathKind::Missing,
        }
    }

    fn check(text: &str) -> Result<ModelInfo, Invalid> {
        validate(text.as_bytes(), &test_lookup)
    }

    #[track_caller]
    fn assert_rejected(text: &str, needle: &str) {
        match check(text) {
            Ok(info) => panic!("accepted, expected {needle:?}: {info:?}"),
            Err(Invalid(message)) => {
                assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            }
        }
    }

    /// A minimal valid model with `extra` appended at the top level.
    fn model(extra: &str) -> String {
        format!("flavors:\n  sklearn:\n    pickled_model: model.pkl\n{extra}")
    }

    /// A minimal valid model with the given signature part.
    fn with_inputs(json: &str) -> String {
        model(&format!("signature:\n  inputs: '{json}'\n"))
    }

    /// Bound for one hostile input in a debug build with other tests running alongside; the
    /// inputs guarded against take from a minute to an out-of-memory abort without the guards.
    const GUARD_LIMIT: Duration = Duration::from_secs(3);

    #[track_caller]
    fn assert_fast<T>(limit: Duration, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        let took = start.elapsed();
        assert!(took < limit, "took {took:?}");
        out
    }

    // --- the real fixtures --------------------------------------------------------------------

    #[test]
    fn fixture_sklearn_iris_is_accepted() {
        let info = validate_fixture("sklearn_iris").unwrap();
        assert_eq!(info.flavors, ["python_function", "sklearn"]);
        assert_eq!(
            info.model_uuid.as_deref(),
            Some(top_level_value("sklearn_iris", "model_uuid").as_str())
        );
        assert_eq!(info.mlflow_version.as_deref(), Some("3.17.2"));
        assert_eq!(
            info.utc_time_created.as_deref(),
            Some(top_level_value("sklearn_iris", "utc_time_created").trim_matches('\''))
        );
        assert_eq!(
            (info.run_id, info.artifact_path, info.model_id),
            (None, None, None)
        );
        let signature: Json = serde_json::from_str(info.signature.as_deref().unwrap()).unwrap();
        let signature = signature.as_object().unwrap();
        assert_eq!(signature.keys().collect::<Vec<_>>(), ["inputs", "outputs"]);
        assert_eq!(signature["inputs"][0]["name"], "sepal length (cm)");
        assert_eq!(signature["inputs"].as_array().unwrap().len(), 4);
        assert_eq!(signature["outputs"][0]["tensor-spec"]["dtype"], "int64");
    }

    #[test]
    fn fixture_sklearn_nosig_is_accepted() {
        let info = validate_fixture("sklearn_nosig").unwrap();
        assert_eq!(info.flavors, ["python_function", "sklearn"]);
        assert_eq!(info.signature, None);
        assert_eq!(
            info.model_uuid.as_deref(),
            Some(top_level_value("sklearn_nosig", "model_uuid").as_str())
        );
    }

    #[test]
    fn fixture_pyfunc_custom_is_accepted() {
        let info = validate_fixture("pyfunc_custom").unwrap();
        assert_eq!(info.flavors, ["python_function"]);
        assert!(info.signature.is_some());
        assert_eq!(
            info.model_uuid.as_deref(),
            Some(top_level_value("pyfunc_custom", "model_uuid").as_str())
        );
    }

    #[test]
    fn fixture_hostile_path_escape_is_rejected() {
        let err = validate_fixture("hostile_path_escape").unwrap_err();
        assert!(err.0.contains("outside the model directory"), "{err}");
    }

    #[test]
    fn fixture_broken_invalid_yaml_is_rejected() {
        let err = validate_fixture("broken_invalid_yaml").unwrap_err();
        assert!(err.0.starts_with("MLmodel is not valid YAML: "), "{err}");
    }

    #[test]
    fn fixture_broken_empty_mlmodel_is_rejected() {
        assert_eq!(
            validate_fixture("broken_empty_mlmodel").unwrap_err().0,
            "MLmodel is empty"
        );
    }

    #[test]
    fn fixture_broken_no_flavors_is_rejected() {
        assert_eq!(
            validate_fixture("broken_no_flavors").unwrap_err().0,
            "MLmodel has no flavors"
        );
    }

    #[test]
    fn fixture_broken_missing_model_file_is_rejected() {
        let err = validate_fixture("broken_missing_model_file").unwrap_err();
        assert_eq!(
            err.0,
            "flavor python_function: model_path names model.pkl, which does not exist"
        );
    }

    #[test]
    fn fixture_broken_no_mlmodel_has_no_mlmodel() {
        let dir = fixture("broken_no_mlmodel");
        assert!(dir.join("model.skops").is_file());
        assert!(!dir.join(MLMODEL_FILE_NAME).exists());
    }

    #[test]
    fn iris_checks_every_path_it_names() {
        let text = iris_text();
        let asked = RefCell::new(Vec::new());
        let lookup = |rel: &str| {
            asked.borrow_mut().push(rel.to_string());
            PathKind::File
        };
        validate(text.as_bytes(), &lookup).unwrap();
        let mut asked = asked.into_inner();
        asked.sort();
        asked.dedup();
        let expected = [
            "conda.yaml",
            "input_example.json",
            "model.skops",
            "python_env.yaml",
            "serving_input_example.json",
        ];
        assert_eq!(asked, expected);
        for missing in expected {
            let lookup = |rel: &str| {
                if rel == missing {
                    PathKind::Missing
                } else {
                    PathKind::File
                }
            };
            let err = validate(text.as_bytes(), &lookup).unwrap_err();
            assert!(
                err.0
                    .contains(&format!("names {missing}, which does not exist")),
                "{err}"
            );
        }
        let lookup = |rel: &str| {
            if rel == "conda.yaml" {
                PathKind::Missing
            } else {
                PathKind::File
            }
        };
        assert_eq!(
            validate(text.as_bytes(), &lookup).unwrap_err().0,
            "flavor python_function: env.conda names conda.yaml, which does not exist"
        );
    }

    // --- size, encoding, emptiness, top level --------------------------------------------------

    #[test]
    fn rejects_empty_whitespace_oversized_and_non_utf8() {
        assert_rejected("", "MLmodel is empty");
        assert_rejected(" \n\t\r\n  ", "MLmodel is empty");
        assert_rejected("# only a comment\n", "MLmodel is empty");
        let big = vec![b' '; MAX_MLMODEL_BYTES + 1];
        let err = validate(&big, &test_lookup).unwrap_err();
        assert!(err.0.contains("more than the limit"), "{err}");
        let err = validate(b"flavors: {sklearn: {}}\nx: \xff\xfe\n", &test_lookup).unwrap_err();
        assert_eq!(err.0, "MLmodel is not valid UTF-8 (bad byte at offset 26)");
    }

    #[test]
    fn rejects_non_mapping_top_level() {
        assert_rejected("- flavors\n", "MLmodel is a sequence, not a mapping");
        assert_rejected("just text\n", "MLmodel is a string, not a mapping");
        assert_rejected("42\n", "MLmodel is a number, not a mapping");
    }

    #[test]
    fn rejects_invalid_yaml_with_parser_message() {
        assert_rejected("flavors: [\n", "MLmodel is not valid YAML: ");
        assert_rejected(
            "a: b: c\n",
            "MLmodel is not valid YAML: mapping values are not allowed",
        );
        assert_rejected("a: 1\n---\nb: 2\n", "MLmodel is not valid YAML: ");
        assert_rejected("a: \"x\u{1}\"\n", "MLmodel is not valid YAML: ");
    }

    #[test]
    fn rejects_duplicate_keys_and_tags() {
        assert_rejected(
            &model("flavors: {}\n"),
            "MLmodel has a duplicate key \"flavors\"",
        );
        assert_rejected(
            "flavors:\n  sklearn:\n    code: null\n    code: code\n",
            "MLmodel has a duplicate key \"code\" in the mapping at line 3",
        );
        assert_rejected(&model("run_id: !custom abc\n"), "YAML tag !custom");
    }

    #[test]
    fn accepts_unknown_top_level_keys_and_unknown_flavors() {
        let text = model(
            "something_new: {a: [1, 2]}\nmetadata:\n  owner: Tom &Jerry\n  \
             note: don't *panic* [really]\n",
        );
        let text = text.replace(
            "flavors:\n",
            "flavors:\n  my_flavor: {custom: 1, loader: x}\n",
        );
        let info = check(&text).unwrap();
        assert_eq!(info.flavors, ["my_flavor", "sklearn"]);
    }

    // --- flavors ---------------------------------------------------------------------------------

    #[test]
    fn rejects_missing_null_empty_or_odd_flavors() {
        assert_rejected("run_id: x\n", "MLmodel has no flavors");
        assert_rejected("flavors:\n", "MLmodel has no flavors (flavors is null)");
        assert_rejected("flavors: {}\n", "MLmodel has no flavors (flavors is empty)");
        assert_rejected(
            "flavors: [sklearn]\n",
            "flavors is a sequence, not a mapping",
        );
        assert_rejected(
            "flavors:\n  sklearn:\n",
            "flavor sklearn: expected a mapping of settings, found null",
        );
        assert_rejected(
            "flavors: {sklearn: model.pkl}\n",
            "flavor sklearn: expected a mapping of settings, found a string",
        );
        assert_rejected("flavors: {1: {}}\n", "key that is not a string: 1");
    }

    #[test]
    fn checks_sklearn_and_python_function_paths() {
        assert!(check(&model("")).is_ok());
        assert_rejected(
            "flavors:\n  sklearn:\n    pickled_model: gone.pkl\n",
            "flavor sklearn: pickled_model names gone.pkl, which does not exist",
        );
        assert_rejected(
            "flavors:\n  sklearn:\n    pickled_model: model.pkl\n    code: nocode\n",
            "flavor sklearn: code names nocode, which does not exist",
        );
        assert_rejected(
            "flavors:\n  sklearn:\n    pickled_model: [model.pkl]\n",
            "flavor sklearn: pickled_model must be a path, found a sequence",
        );
        let pyfunc = |body: &str| format!("flavors:\n  python_function:\n{body}");
        assert!(
            check(&pyfunc(
                "    loader_module: x\n    model_path: model.pkl\n    code: code\n    data: data\n"
            ))
            .is_ok()
        );
        for key in ["model_path", "data", "code", "python_model"] {
            assert_rejected(
                &pyfunc(&format!("    {key}: nope\n")),
                &format!("flavor python_function: {key} names nope, which does not exist"),
            );
            assert_rejected(
                &pyfunc(&format!("    {key}: 3\n")),
                "must be a path, found a number",
            );
        }
        assert!(check(&pyfunc("    env: conda.yaml\n")).is_ok());
        assert_rejected(
            &pyfunc("    env: gone.yaml\n"),
            "env names gone.yaml, which does not exist",
        );
        assert_rejected(
            &pyfunc("    env:\n      conda: conda.yaml\n      virtualenv: venv.yaml\n"),
            "env.virtualenv names venv.yaml, which does not exist",
        );
        assert_rejected(&pyfunc("    env: [a]\n"), "env must be a path or a mapping");
        assert!(
            check(&pyfunc(
                "    artifacts:\n      tok:\n        path: sub/model.pkl\n        uri: s3://x\n"
            ))
            .is_ok()
        );
        assert_rejected(
            &pyfunc("    artifacts:\n      tok:\n        path: sub/gone\n"),
            "flavor python_function: artifacts.tok.path names sub/gone, which does not exist",
        );
        assert_rejected(
            &pyfunc("    artifacts: [a]\n"),
            "artifacts must be a mapping",
        );
        assert_rejected(
            &pyfunc("    artifacts: {tok: x}\n"),
            "artifacts.tok must be a mapping",
        );
    }

    #[test]
    fn checks_file_keys_of_other_flavors() {
        for key in FLAVOR_PATH_KEYS {
            let text = format!("flavors:\n  pytorch:\n    {key}: missing_thing\n");
            assert_rejected(
                &text,
                &format!("flavor pytorch: {key} names missing_thing, which does not exist"),
            );
            // A non-string value under another flavor's key is that flavor's business.
            assert!(check(&format!("flavors:\n  pytorch:\n    {key}: {{a: 1}}\n")).is_ok());
        }
        assert_rejected(
            "flavors:\n  transformers:\n    artifacts:\n      w:\n        path: weights.bin\n",
            "flavor transformers: artifacts.w.path names weights.bin, which does not exist",
        );
        assert!(
            check("flavors:\n  pytorch:\n    model_data: data\n    pytorch_version: 2.1\n").is_ok()
        );
    }

    #[test]
    fn checks_saved_input_example_info() {
        let ok = model(
            "saved_input_example_info:\n  artifact_path: input_example.json\n  serving_input_path: serving_input_example.json\n  type: dataframe\n",
        );
        assert!(check(&ok).is_ok());
        assert_rejected(
            &model("saved_input_example_info:\n  artifact_path: nope.json\n"),
            "saved_input_example_info: artifact_path names nope.json, which does not exist",
        );
        assert_rejected(
            &model("saved_input_example_info:\n  serving_input_path: ../x.json\n"),
            "saved_input_example_info: serving_input_path names ../x.json, which points outside the model directory",
        );
        assert_rejected(
            &model("saved_input_example_info: x\n"),
            "saved_input_example_info is a string, not a mapping",
        );
    }

    // --- paths -----------------------------------------------------------------------------------

    #[test]
    fn rejects_paths_escaping_the_model_directory() {
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../../x",
            "./../x",
            "sub/..",
            "..",
            "//etc/passwd",
        ] {
            let text = format!("flavors:\n  sklearn:\n    pickled_model: '{bad}'\n");
            assert_rejected(
                &text,
                &format!(
                    "flavor sklearn: pickled_model names {bad}, which points outside the model directory"
                ),
            );
        }
        assert_rejected(
            "flavors:\n  sklearn:\n    pickled_model: ''\n",
            "pickled_model is an empty path",
        );
        assert_rejected(
            "flavors:\n  sklearn:\n    pickled_model: \"a\\0b\"\n",
            "NUL character",
        );
    }

    #[test]
    fn normalises_paths_before_lookup() {
        assert_eq!(normalize_path("./model.pkl"), Ok("model.pkl".to_string()));
        assert_eq!(
            normalize_path("sub//model.pkl/"),
            Ok("sub/model.pkl".to_string())
        );
        assert_eq!(
            normalize_path("./sub/./model.pkl"),
            Ok("sub/model.pkl".to_string())
        );
        assert_eq!(normalize_path("."), Ok(String::new()));
        assert_eq!(normalize_path("a/../b"), Err(BadPath::Outside));
        let asked = RefCell::new(Vec::new());
        let lookup = |rel: &str| {
            asked.borrow_mut().push(rel.to_string());
            PathKind::File
        };
        let text = "flavors:\n  sklearn:\n    pickled_model: ./sub//model.pkl\n    code: .\n";
        validate(text.as_bytes(), &lookup).unwrap();
        assert_eq!(asked.into_inner(), ["sub/model.pkl"]);
    }

    #[test]
    fn accepts_files_or_directories() {
        let text = "flavors:\n  sklearn:\n    pickled_model: sub\n    code: code\n  python_function:\n    code: model.pkl\n";
        assert!(check(text).is_ok());
    }

    // --- signature -------------------------------------------------------------------------------

    #[test]
    fn accepts_rich_signatures() {
        let inputs = r#"[{"type": "array", "items": {"type": "object", "properties": {"a": {"type": "map", "values": {"type": "string"}, "required": false}, "b": {"type": "array", "items": {"type": "double"}, "required": true}}}, "name": "x", "required": true}, {"type": "any", "name": "y", "required": false}, {"type": "datetime", "name": "z"}, {"type": "sparkml_vector", "name": "v"}]"#;
        let outputs = r#"[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 4]}, "name": "p"}, {"type": "tensor", "tensor-spec": {"dtype": "datetime64[ns]", "shape": []}, "name": "q"}]"#;
        let params = r#"[{"name": "temperature", "type": "float", "default": 0.5, "shape": null}, {"name": "stop", "type": "string", "default": ["a"], "shape": [-1]}, {"name": "cfg", "type": "object", "properties": {"k": {"type": "long"}}, "default": {"k": 1}}, {"name": "old", "dtype": "boolean", "default": true}]"#;
        let text = model(&format!(
            "signature:\n  inputs: '{inputs}'\n  outputs: '{outputs}'\n  params: '{params}'\n"
        ));
        let info = check(&text).unwrap();
        let signature: Json = serde_json::from_str(&info.signature.unwrap()).unwrap();
        assert_eq!(signature["params"][1]["default"][0], "a");
        assert_eq!(
            signature["outputs"][1]["tensor-spec"]["dtype"],
            "datetime64[ns]"
        );
        // Only the non-null parts are kept; no non-null part means no signature.
        let info = check(&model(
            "signature:\n  inputs: null\n  outputs: '[{\"type\": \"long\"}]'\n",
        ))
        .unwrap();
        assert_eq!(
            info.signature.as_deref(),
            Some(r#"{"outputs":[{"type":"long"}]}"#)
        );
        let info = check(&model(
            "signature:\n  inputs: null\n  outputs: null\n  params: null\n",
        ))
        .unwrap();
        assert_eq!(info.signature, None);
    }

    #[test]
    fn rejects_unknown_column_type() {
        assert_rejected(
            &with_inputs(r#"[{"type": "double", "name": "a"}, {"type": "decimal", "name": "b"}]"#),
            "signature.inputs[1] has unknown type \"decimal\"",
        );
        assert_rejected(
            &with_inputs(r#"[{"type": "array", "items": {"type": "tensor"}}]"#),
            "signature.inputs[0].items has unknown type \"tensor\"",
        );
        assert_rejected(
            &with_inputs(r#"[{"type": "object", "properties": {"p": {"type": "Double"}}}]"#),
            "signature.inputs[0].properties.p has unknown type \"Double\"",
        );
    }

    #[test]
    fn rejects_signature_strings_that_are_not_json() {
        assert_rejected(
            &with_inputs("[{type: double}]"),
            "signature.inputs is not valid JSON: ",
        );
        assert_rejected(
            &with_inputs("not json at all"),
            "signature.inputs is not valid JSON: ",
        );
        assert_rejected(
            &with_inputs(r#"{"type": "double"}"#),
            "signature.inputs is not a JSON list",
        );
        assert_rejected(
            &model("signature:\n  outputs: [a]\n"),
            "signature.outputs must be a string holding JSON, found a sequence",
        );
        assert_rejected(
            &model("signature: true\n"),
            "signature is a boolean, not a mapping",
        );
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_rejected(
            &with_inputs(&deep),
            "signature.inputs is not valid JSON: recursion limit exceeded",
        );
    }

    #[test]
    fn rejects_tensor_spec_without_shape() {
        assert_rejected(
            &with_inputs(r#"[{"type": "tensor", "tensor-spec": {"dtype": "float64"}}]"#),
            "signature.inputs[0]: tensor-spec has no shape",
        );
        assert_rejected(
            &with_inputs(r#"[{"type": "tensor", "tensor-spec": {"shape": [-1]}}]"#),
            "signature.inputs[0]: tensor-spec has no dtype",
        );
        assert_rejected(
            &with_inputs(
                r#"[{"type": "tensor", "tensor-spec": {"dtype": "float65", "shape": [-1]}}]"#,
            ),
            "tensor-spec has unknown dtype \"float65\"",
        );
        assert_rejected(
            &with_inputs(
                r#"[{"type": "tensor", "tensor-spec": {"dtype": "int8", "shape": [-1, "x"]}}]"#,
            ),
            "shape must be a list of integers",
        );
        assert_rejected(
            &with_inputs(r#"[{"type": "tensor"}]"#),
            "tensor has no tensor-spec",
        );
    }

    #[test]
    fn rejects_malformed_schemas() {
        assert_rejected(&with_inputs("[]"), "signature.inputs is an empty list");
        assert_rejected(
            &with_inputs("[1]"),
            "signature.inputs[0] is not a JSON object",
        );
        assert_rejected(
            &with_inputs(r#"[{"name": "a"}]"#),
            "signature.inputs[0] has no type",
        );
        assert_rejected(
            &with_inputs(r#"[{"type": "array"}]"#),
            "array type has no items",
        );
        assert_rejected(
            &with_inputs(r#"[{"type": "map", "values": 3}]"#),
            "values must be a JSON object",
        );
        assert_rejected(
            &with_inputs(r#"[{"type": "object", "properties": {}}]"#),
            "object type has no properties",
        );
        assert_rejected(
            &with_inputs(r#"[{"type": "double", "required": "yes"}]"#),
            "required must be true or false",
        );
        assert_rejected(
            &with_inputs(
                r#"[{"type": "double", "name": "a"}, {"type": "tensor", "name": "b", "tensor-spec": {"dtype": "int64", "shape": [-1]}}]"#,
            ),
            "mixes tensor specs and column specs",
        );
        assert_rejected(
            &with_inputs(r#"[{"type": "double", "name": "a"}, {"type": "double"}]"#),
            "mixes named and unnamed",
        );
        assert_rejected(
            &with_inputs(r#"[{"type": "double", "required": false}]"#),
            "unnamed optional column",
        );
        let tensor = r#"{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}"#;
        assert_rejected(
            &with_inputs(&format!("[{tensor}, {tensor}]")),
            "several unnamed tensor specs",
        );
        let nested = format!(
            "{}{}",
            r#"{"type": "array", "items": "#.repeat(40),
            r#"{"type": "long"}"#
        ) + &"}".repeat(40);
        assert_rejected(
            &with_inputs(&format!("[{nested}]")),
            "types nest deeper than 32 levels",
        );
    }

    #[test]
    fn rejects_malformed_params() {
        let params = |json: &str| model(&format!("signature:\n  params: '{json}'\n"));
        assert!(check(&params("[]")).is_ok());
        assert_rejected(
            &params(r#"[{"type": "long", "default": 1}]"#),
            "signature.params[0] has no name",
        );
        assert_rejected(
            &params(r#"[{"name": "a", "type": "long"}]"#),
            "signature.params[0] has no default",
        );
        assert_rejected(
            &params(r#"[{"name": "a", "default": 1}]"#),
            "signature.params[0] has no type",
        );
        assert_rejected(
            &params(r#"[{"name": "a", "type": "binary", "default": null}]"#),
            "binary is not allowed",
        );
        assert_rejected(
            &params(r#"[{"name": "a", "type": "tensor", "default": 1}]"#),
            "has unknown type \"tensor\"",
        );
        assert_rejected(
            &params(r#"[{"name": "a", "type": "long", "default": 1, "shape": [2]}]"#),
            "shape must be null or [-1]",
        );
        assert_rejected(
            &params(r#"[{"name": "a", "type": "long", "default": 1, "shape": [-1]}]"#),
            "default must be a list",
        );
        assert_rejected(
            &params(
                r#"[{"name": "a", "type": "long", "default": 1}, {"name": "a", "type": "long", "default": 2}]"#,
            ),
            "duplicate parameter \"a\"",
        );
    }

    #[test]
    fn numpy_dtype_names() {
        for ok in [
            "bool",
            "int64",
            "uint8",
            "float16",
            "str",
            "bytes",
            "object",
            "datetime64",
            "datetime64[ns]",
            "timedelta64[10s]",
            "complex128",
        ] {
            assert!(is_numpy_dtype(ok), "{ok}");
        }
        for bad in [
            "",
            "int",
            "float",
            "str320",
            "<U0",
            "datetime64[]",
            "datetime64[xs]",
            "Int64",
        ] {
            assert!(!is_numpy_dtype(bad), "{bad}");
        }
    }

    // --- recorded facts --------------------------------------------------------------------------

    #[test]
    fn extracts_top_level_facts() {
        let text = model(
            "run_id: 0123abc\nartifact_path: model\nmodel_uuid: 1234\nmodel_id: null\n\
             utc_time_created: '2026-01-01 00:00:00'\nmlflow_version: 2.5\n",
        );
        let info = check(&text).unwrap();
        assert_eq!(info.run_id.as_deref(), Some("0123abc"));
        assert_eq!(info.artifact_path.as_deref(), Some("model"));
        assert_eq!(info.model_uuid.as_deref(), Some("1234"));
        assert_eq!(info.model_id, None);
        assert_eq!(
            info.utc_time_created.as_deref(),
            Some("2026-01-01 00:00:00")
        );
        assert_eq!(info.mlflow_version.as_deref(), Some("2.5"));
        assert_eq!(
            check(&model("run_id: true\n")).unwrap().run_id.as_deref(),
            Some("true")
        );
        assert_rejected(
            &model("run_id: [a]\n"),
            "MLmodel run_id must be a scalar, found a sequence",
        );
        assert_rejected(
            &model("model_uuid: {a: 1}\n"),
            "MLmodel model_uuid must be a scalar, found a mapping",
        );
    }

    // --- parser guards ---------------------------------------------------------------------------

    /// `a0: &a0 [lol]`, then `levels` anchors each listing the previous one `fan` times.
    fn alias_bomb(levels: usize, fan: usize) -> String {
        let mut text = model("a0: &a0 [lol]\n");
        for i in 1..=levels {
            let refs = vec![format!("*a{}", i - 1); fan].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        text
    }

    #[test]
    fn rejects_billion_laughs_before_parsing() {
        let err = assert_fast(GUARD_LIMIT, || check(&alias_bomb(9, 10)).unwrap_err());
        assert!(
            err.0.starts_with("MLmodel uses more than 64 YAML aliases"),
            "{err}"
        );
    }

    #[test]
    fn rejects_alias_bombs_within_the_alias_limit() {
        // 64 aliases expanding to 8^8 = 16.7 million leaves.
        let err = assert_fast(GUARD_LIMIT, || check(&alias_bomb(8, 8)).unwrap_err());
        assert!(err.0.contains("YAML aliases"), "{err}");
        // Quadratic: one anchored list of 20,000 items aliased 60 times (1.2 million nodes);
        // serde_yaml's own repetition limit (100 alias jumps per event) does not stop this one.
        let items = vec!["x"; 20_000].join(",");
        let refs = vec!["*big"; 60].join(", ");
        let text = model(&format!("big: &big [{items}]\nall: [{refs}]\n"));
        let err = assert_fast(GUARD_LIMIT, || check(&text).unwrap_err());
        assert!(err.0.starts_with("MLmodel expands to more than"), "{err}");
        // The same with one long string instead of a list.
        let text = model(&format!(
            "big: &big {}\nall: [{refs}]\n",
            "x".repeat(100_000)
        ));
        let err = assert_fast(GUARD_LIMIT, || check(&text).unwrap_err());
        assert!(
            err.0.starts_with("MLmodel expands to too much scalar text"),
            "{err}"
        );
        // A few aliases expanding to little are fine.
        let info = check(&model("base: &base {a: 1}\none: *base\ntwo: *base\n"));
        assert!(info.is_ok(), "{info:?}");
        assert_rejected(&model("a: &a [*a]\n"), "deeper than 64 levels");
    }

    #[test]
    fn rejects_deep_flow_nesting_before_parsing() {
        for unit in ["[", "{a: ", "[{a: "] {
            let text = model(&format!("deep: {}\n", unit.repeat(100_000)));
            let err = assert_fast(GUARD_LIMIT, || check(&text).unwrap_err());
            assert!(
                err.0
                    .starts_with("MLmodel nests YAML flow collections deeper than 64 levels"),
                "{err}"
            );
        }
        let ok = model(&format!("deep: {}{}\n", "[".repeat(60), "]".repeat(60)));
        assert!(check(&ok).is_ok());
        let too_deep = model(&format!("deep: {}{}\n", "[".repeat(65), "]".repeat(65)));
        assert_rejected(&too_deep, "deeper than 64 levels");
    }

    #[test]
    fn rejects_deep_block_nesting_while_parsing() {
        let text = model(&format!("deep:\n{}x\n", "- ".repeat(100_000)));
        let err = assert_fast(GUARD_LIMIT, || check(&text).unwrap_err());
        assert!(
            err.0
                .starts_with("MLmodel nests YAML collections deeper than 64 levels"),
            "{err}"
        );
        let mut nested = model("");
        for level in 0..70 {
            nested.push_str(&format!("{}k{level}:\n", " ".repeat(level)));
        }
        nested.push_str(&format!("{}leaf: 1\n", " ".repeat(70)));
        assert_rejected(&nested, "deeper than 64 levels");
    }

    #[test]
    fn quotes_comments_and_block_scalars_cannot_hide_deep_flow() {
        let deep = "{a: ".repeat(100_000);
        let tricks = [
            // A quote that only continues a plain scalar: libyaml does not see a quoted scalar.
            format!("k: abc\n  'xyz\nx: {deep}\n"),
            format!("k: abc\n  \"xyz\nx: {deep}\n"),
            // A block scalar holding an unmatched quote, then the bomb after it ends.
            format!("k: |\n  don't\nx: {deep}\n"),
            format!("k: >-\n  \"\n  x\nx: {deep}\n"),
            // A comment-looking '#' inside a plain scalar.
            format!("k: a#b 'c\nx: {deep}\n"),
            // Quotes inside tags are tag characters.
            format!("k: !a'b\nx: {deep}\n"),
            format!("k: [!a'b, {deep}\n"),
            format!("k: [!<a,b'c> , {deep}\n"),
            // A quote closed by a doubled quote.
            format!("k: 'it''s'\nx: {deep}\n"),
            // A plain scalar continued in flow context.
            format!("k: [a\n 'b, {deep}\n"),
        ];
        for text in tricks {
            let text = model(&text);
            let result = assert_fast(GUARD_LIMIT, || check(&text));
            let err = result.expect_err("must be rejected");
            assert!(err.0.contains("deeper than 64 levels"), "{err}");
        }
    }

    #[test]
    fn brackets_in_quotes_comments_and_plain_text_are_not_flow() {
        let many = "[".repeat(200);
        let texts = [
            format!("note: '{many}'\n"),
            format!("note: \"{many}\"\n"),
            format!("note: x{many}\n"),
            format!("# {many}\nnote: 1\n"),
            // Line starts inside block scalars and plain scalars are read both ways (see
            // `prescan`), so the brackets here follow other text.
            format!("note: |\n  first\n  a {many}\n\n   b{many}\nafter: 1\n"),
            format!("note: >-\n\n  first\n  '{many}\n  x {many}\nafter: 1\n"),
            format!("note: long plain\n  text {many}\n  going on\nafter: 1\n"),
            format!("note: 'multi\n  line {many}\n  still'\n"),
            format!("note: \"esc \\\" {many}\"\n"),
        ];
        for text in texts {
            let text = model(&text);
            let result = check(&text);
            assert!(result.is_ok(), "{text:?}: {result:?}");
        }
    }

    #[test]
    fn accepts_a_one_mebibyte_single_line_value() {
        for quote in ["", "'", "\""] {
            let head = model("description: ");
            let room = MAX_MLMODEL_BYTES - head.len() - 2 * quote.len() - 1;
            let text = format!("{head}{quote}{}{quote}\n", "x".repeat(room));
            assert_eq!(text.len(), MAX_MLMODEL_BYTES);
            let info = assert_fast(GUARD_LIMIT, || check(&text));
            assert!(info.is_ok(), "{quote}: {info:?}");
        }
        let head = model("description: ");
        let text = format!("{head}{}\n", "x".repeat(MAX_MLMODEL_BYTES - head.len()));
        assert_rejected(&text, "more than the limit");
    }

    #[test]
    fn deep_documents_need_little_stack() {
        // Nesting is capped at 64 levels, so a small thread stack is enough even in debug builds.
        let handle = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(|| {
                let deep = model(&format!("deep: {}{}\n", "[".repeat(62), "]".repeat(62)));
                assert!(check(&deep).is_ok());
                let deeper = model(&format!("deep:\n{}x\n", "- ".repeat(10_000)));
                assert!(check(&deeper).is_err());
                assert!(check(&model("a: &a [*a]\n")).is_err());
            })
            .unwrap();
        handle.join().unwrap();
    }

    // --- robustness ------------------------------------------------------------------------------

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    const INTERESTING: &[u8] = b"[]{}'\"&*!|>:-?#,%@`\n\r\t \\~.0x<";

    fn mutate(base: &[u8], rng: &mut XorShift) -> Vec<u8> {
        let mut out = base.to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(out.len() + 1);
            let byte = at.min(out.len().saturating_sub(1));
            match rng.below(8) {
                0 if !out.is_empty() => out[byte] ^= 1 << rng.below(8),
                1 if !out.is_empty() => out[byte] = rng.next() as u8,
                2 if !out.is_empty() => out[byte] = INTERESTING[rng.below(INTERESTING.len())],
                3 => out.truncate(at),
                4 => {
                    let run: Vec<u8> = (0..1 + rng.below(8))
                        .map(|_| INTERESTING[rng.below(INTERESTING.len())])
                        .collect();
                    out.splice(at..at, run);
                }
                5 => {
                    let end = (at + rng.below(64)).min(out.len());
                    out.drain(at..end);
                }
                6 => {
                    let from = rng.below(out.len());
                    let end = (from + rng.below(200)).min(out.len());
                    let chunk = out[from..end].to_vec();
                    let at = rng.below(out.len() + 1);
                    out.splice(at..at, chunk);
                }
                _ => {
                    let unit = INTERESTING[rng.below(INTERESTING.len())];
                    out.splice(at..at, std::iter::repeat_n(unit, rng.below(3000)));
                }
            }
        }
        out
    }

    #[test]
    fn mutated_and_random_inputs_never_panic_or_hang() {
        let base = iris_text().into_bytes();
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let start = Instant::now();
        let (mut accepted, mut rejected) = (0, 0);
        for round in 0..2000 {
            let input = if round % 10 == 9 {
                let len = rng.below(4096);
                if round % 20 == 9 {
                    (0..len).map(|_| rng.next() as u8).collect()
                } else {
                    (0..len)
                        .map(|_| INTERESTING[rng.below(INTERESTING.len())])
                        .collect()
                }
            } else {
                mutate(&base, &mut rng)
            };
            let one = Instant::now();
            match validate(&input, &test_lookup) {
                Ok(_) => accepted += 1,
                Err(Invalid(message)) => {
                    assert!(!message.is_empty());
                    rejected += 1;
                }
            }
            let took = one.elapsed();
            assert!(
                took < Duration::from_secs(1),
                "round {round} took {took:?}: {input:?}"
            );
        }
        assert!(
            accepted > 0 && rejected > 0,
            "{accepted} accepted, {rejected} rejected"
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }

    fn env_check(yaml: &str, env_path: &str) -> Result<(), Invalid> {
        check_python_env(yaml.as_bytes(), env_path, &test_lookup)
    }

    #[test]
    fn python_env_requirement_files_must_exist() {
        let fixture_env = fs::read(fixture("sklearn_iris").join("python_env.yaml")).unwrap();
        assert_eq!(
            check_python_env(&fixture_env, "python_env.yaml", &test_lookup),
            Ok(())
        );
        let none = |_: &str| PathKind::Missing;
        assert_eq!(
            check_python_env(&fixture_env, "python_env.yaml", &none)
                .unwrap_err()
                .0,
            "python_env.yaml: -r names requirements.txt, which does not exist"
        );
        // pip's spellings of the option; other dependencies are not files.
        for dep in [
            "-r requirements.txt",
            "-rrequirements.txt",
            "--requirement requirements.txt",
            "--requirement=requirements.txt",
            "-c requirements.txt",
            "--constraint=requirements.txt",
        ] {
            let yaml = format!("dependencies:\n- mlflow==3.17.2\n- '{dep}'\n");
            assert_eq!(env_check(&yaml, "python_env.yaml"), Ok(()), "{dep}");
            let missing = yaml.replace("requirements.txt", "other.txt");
            let err = env_check(&missing, "python_env.yaml").unwrap_err().0;
            assert!(
                err.contains("names other.txt, which does not exist"),
                "{dep}: {err}"
            );
        }
        assert_eq!(
            env_check("dependencies:\n- numpy\n- --requirementx\n", "e.yaml"),
            Ok(())
        );
        assert_eq!(env_check("python: 3.11.7\n", "python_env.yaml"), Ok(()));
        // Paths are relative to the environment file, and stay inside the model.
        assert_eq!(
            env_check("dependencies: [-r model.pkl]\n", "sub/env.yaml"),
            Ok(())
        );
        assert_eq!(
            env_check("dependencies: [-r conda.yaml]\n", "sub/env.yaml"),
            Err(Invalid(
                "sub/env.yaml: -r names sub/conda.yaml, which does not exist".into()
            ))
        );
        assert!(
            env_check("dependencies: [-r ../x.txt]\n", "python_env.yaml")
                .unwrap_err()
                .0
                .contains("points outside the model directory")
        );
        assert!(
            env_check("dependencies: [-r /etc/passwd]\n", "python_env.yaml")
                .unwrap_err()
                .0
                .contains("points outside the model directory")
        );
        assert_eq!(
            env_check("dependencies: [-r]\n", "python_env.yaml")
                .unwrap_err()
                .0,
            "python_env.yaml: -r names no file"
        );
    }

    #[test]
    fn a_bad_python_env_file_is_reported_under_its_own_name() {
        for (yaml, message) in [
            ("", "python_env.yaml is empty"),
            ("dependencies: [\n", "python_env.yaml is not valid YAML: "),
            ("- a\n", "python_env.yaml is a sequence, not a mapping"),
            (
                "dependencies: numpy\n",
                "python_env.yaml: dependencies must be a list",
            ),
            (
                "dependencies: [{a: 1}]\n",
                "python_env.yaml: dependencies must be strings",
            ),
        ] {
            let err = env_check(yaml, "python_env.yaml").unwrap_err().0;
            assert!(err.starts_with(message), "{yaml:?}: {err}");
        }
        let bomb = format!("a: &a [{}]\n{}", "x,".repeat(10), "b: *a\n".repeat(100));
        let err = env_check(&bomb, "python_env.yaml").unwrap_err().0;
        assert!(err.starts_with("python_env.yaml "), "{err}");
    }

    #[test]
    fn the_virtualenv_file_is_reported_for_the_registry() {
        let info = validate(
            &fs::read(fixture("sklearn_iris").join("MLmodel")).unwrap(),
            &|_| PathKind::File,
        )
        .unwrap();
        assert_eq!(info.python_env.as_deref(), Some("python_env.yaml"));
        assert_eq!(check(&model("")).unwrap().python_env, None);
    }
}
