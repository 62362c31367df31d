//! Shard lists: brace patterns, globs, directories, list files and `pipe:` commands, as the
//! Python webdataset library and open_clip accept them.

use std::path::Path;

use crate::DataError;

/// Expands a shard spec into a list of shard URLs (paths or `pipe:CMD`).
///
/// The spec is one or more parts joined by `::`. Each part is, in this order of checks:
/// - `pipe:CMD` (kept as is; braces in CMD are expanded, e.g. `pipe:cat d/{0..3}.tar`),
/// - an existing directory (its `*.tar` files, sorted),
/// - an existing file not ending in `.tar` (one shard URL per non-empty line, `#` comments),
/// - a brace pattern (`d/{000000..000127}.tar`, `{a,b}`) whose expansions are globbed.
///
/// A part that yields no existing shard is an error naming it: a typo must not train on nothing.
pub fn expand_shards(spec: &str) -> Result<Vec<String>, DataError> {
    let mut out = Vec::new();
    for part in spec.split("::").map(str::trim).filter(|p| !p.is_empty()) {
        let before = out.len();
        expand_part(part, &mut out)?;
        if out.len() == before {
            return Err(DataError::NoShards(part.to_string()));
        }
    }
    if out.is_empty() {
        return Err(DataError::NoShards(spec.to_string()));
    }
    Ok(out)
}

fn expand_part(part: &str, out: &mut Vec<String>) -> Result<(), DataError> {
    if part.starts_with("pipe:") {
        out.extend(expand_braces(part)?);
        return Ok(());
    }
    let path = Path::new(part);
    if path.is_dir() {
        let mut tars: Vec<String> = std::fs::read_dir(path)
            .map_err(|e| DataError::io(part, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "tar"))
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        tars.sort();
        out.extend(tars);
        return Ok(());
    }
    if path.is_file() && !part.ends_with(".tar") {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(part, e))?;
        for line in text.lines().map(str::trim) {
            if !line.is_empty() && !line.starts_with('#') {
                expand_part(line, out)?;
            }
        }
        return Ok(());
    }
    for p in expand_braces(part)? {
        if p.contains(['*', '?', '[']) {
            let pattern =
                glob::glob(&p).map_err(|e| DataError::Pattern(p.clone(), e.to_string()))?;
            let mut found: Vec<String> = pattern
                .filter_map(|e| e.ok())
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            found.sort();
            out.extend(found);
        } else if Path::new(&p).is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// Expands `{a,b}` alternatives and `{000..123}` zero-padded numeric ranges, left to right,
/// including several groups in one pattern (`{a,b}/{0..2}.tar`).
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, DataError> {
    let Some(open) = pattern.find('{') else {
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..]
        .find('}')
        .map(|i| open + i)
        .ok_or_else(|| DataError::Pattern(pattern.into(), "unclosed '{'".into()))?;
    let (head, body, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let alternatives = brace_alternatives(pattern, body)?;
    let rest = expand_braces(tail)?;
    let mut out = Vec::with_capacity(alternatives.len() * rest.len());
    for a in &alternatives {
        for r in &rest {
            out.push(format!("{head}{a}{r}"));
        }
    }
    Ok(out)
}

fn brace_alternatives(pattern: &str, body: &str) -> Result<Vec<String>, DataError> {
    if let Some((lo, hi)) = body.split_once("..") {
        let bad = || DataError::Pattern(pattern.into(), format!("bad range {{{body}}}"));
        let (a, b): (u64, u64) = (
            lo.parse().map_err(|_| bad())?,
            hi.parse().map_err(|_| bad())?,
        );
        if a > b {
            return Err(bad());
        }
        let width = if lo.starts_with('0') { lo.len() } else { 0 };
        return Ok((a..=b).map(|i| format!("{i:0width$}")).collect());
    }
    Ok(body.split(',').map(str::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_ranges_and_lists() {
        assert_eq!(
            expand_braces("d/{000..002}.tar").unwrap(),
            ["d/000.tar", "d/001.tar", "d/002.tar"]
        );
        assert_eq!(
            expand_braces("{a,b}/{8..10}").unwrap(),
            ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        assert!(expand_braces("d/{3..1}.tar").is_err());
        assert!(expand_braces("d/{0..1.tar").is_err());
    }

    #[test]
    fn patterns_dirs_lists_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for i in 0..3 {
            std::fs::write(d.join(format!("s-{i:03}.tar")), b"").unwrap();
        }
        let ds = d.to_string_lossy();
        let brace = format!("{ds}/s-{{000..001}}.tar");
        assert_eq!(expand_shards(&brace).unwrap().len(), 2);
        assert_eq!(expand_shards(&ds).unwrap().len(), 3);
        assert_eq!(expand_shards(&format!("{ds}/*.tar")).unwrap().len(), 3);
        let joined = format!("{brace}::{ds}/s-002.tar");
        assert_eq!(expand_shards(&joined).unwrap().len(), 3);
        let list = d.join("list.txt");
        std::fs::write(
            &list,
            format!("# shards\n{ds}/s-000.tar\n\n{ds}/s-002.tar\n"),
        )
        .unwrap();
        assert_eq!(expand_shards(&list.to_string_lossy()).unwrap().len(), 2);
        let missing = format!("{ds}/nope-{{0..3}}.tar");
        let err = expand_shards(&missing).unwrap_err().to_string();
        assert!(err.contains("nope-{0..3}.tar"), "{err}");
        assert_eq!(
            expand_shards("pipe:cat a/{0..1}.tar").unwrap(),
            ["pipe:cat a/0.tar", "pipe:cat a/1.tar"]
        );
    }
}
