//! Small file helpers: JSON writing and all-or-nothing output directories.

use anyhow::{bail, Context, Result};
use std::cell::Cell;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// An output directory that appears only when complete: files are written into a hidden sibling
/// and renamed into place by `commit`. Dropped uncommitted, the partial directory is removed.
pub struct StagedDir {
    staging: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedDir {
    pub fn new(target: &Path) -> Result<Self> {
        if target.exists() {
            let empty = target.is_dir()
                && std::fs::read_dir(target)
                    .map(|mut d| d.next().is_none())
                    .unwrap_or(false);
            if !empty {
                bail!(
                    "output {} already exists; choose another path or remove it",
                    target.display()
                );
            }
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.exists() {
            std::fs::create_dir_all(&parent)
                .with_context(|| format!("cannot create directory {}", parent.display()))?;
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let staging = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if staging.exists() {
            std::fs::remove_dir_all(&staging).ok();
        }
        std::fs::create_dir(&staging)
            .with_context(|| format!("cannot write to {} (is it writable?)", parent.display()))?;
        Ok(StagedDir {
            staging,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.staging
    }

    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.exists() {
            std::fs::remove_dir(&self.target)
                .with_context(|| format!("cannot replace {}", self.target.display()))?;
        }
        std::fs::rename(&self.staging, &self.target)
            .with_context(|| format!("cannot move output into {}", self.target.display()))?;
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            std::fs::remove_dir_all(&self.staging).ok();
        }
    }
}

/// Longer than this, a part of an error line is cut: messages quote names and values from the
/// files they are about, which a hostile file can make as long as it likes.
const MAX_ERROR_PART_CHARS: usize = 300;

/// An error and its causes on one line, outermost first. Only the first line of each is kept
/// (candle appends a backtrace to its messages when RUST_BACKTRACE is set), each is cut at
/// [`MAX_ERROR_PART_CHARS`], and control characters from a file are shown escaped, never sent
/// to the terminal.
pub fn one_line_error(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        let first = printable(text.lines().next().unwrap_or("").trim());
        // Contexts often repeat their cause's text; keep each piece once.
        if !first.is_empty() && !parts.iter().any(|p| p.contains(&first)) {
            parts.push(first);
        }
    }
    parts.join(": ")
}

/// `text` with control characters escaped (`\u{1b}`), cut at [`MAX_ERROR_PART_CHARS`].
pub fn printable(text: &str) -> String {
    let mut out = String::new();
    let mut shown = 0;
    for c in text.chars() {
        let piece: Vec<char> = if c.is_control() {
            c.escape_default().collect()
        } else {
            vec![c]
        };
        if shown + piece.len() > MAX_ERROR_PART_CHARS {
            out.push('…');
            break;
        }
        shown += piece.len();
        out.extend(piece);
    }
    out
}

/// One line read by [`read_line_bounded`].
pub enum BoundedLine {
    /// The line's bytes, without its `\n` (or `\r\n`).
    Line(Vec<u8>),
    /// The line goes on past the limit (what was read of it is dropped).
    TooLong,
}

/// The next line of `r` (None at the end), reading at most `limit` + 1 bytes of it: a file or
/// a program that sends one endless line gets an error, not all the memory there is.
pub fn read_line_bounded(
    r: &mut impl BufRead,
    limit: usize,
) -> std::io::Result<Option<BoundedLine>> {
    let mut buf = Vec::new();
    let n = Read::take(&mut *r, limit as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    } else if buf.len() > limit {
        return Ok(Some(BoundedLine::TooLong));
    }
    Ok(Some(BoundedLine::Line(buf)))
}

/// `~/x` → `$HOME/x` (config files are not seen by a shell).
pub fn expand_tilde(path: &str) -> String {
    match (path.strip_prefix("~/"), std::env::var("HOME")) {
        (Some(rest), Ok(home)) => format!("{home}/{rest}"),
        _ => path.to_string(),
    }
}

/// Writes `bytes` to `path` through a temporary sibling and a rename: `path` is either absent or
/// complete.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let written = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if written.is_err() {
        // A full disk or a read-only directory leaves nothing behind.
        std::fs::remove_file(&tmp).ok();
    }
    written.with_context(|| format!("cannot write {}", path.display()))
}

/// Refuses a path that is not a regular file (a directory, a FIFO that would block the read
/// forever, a device), naming it.
pub fn require_regular_file(path: &Path) -> Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO or a device?)"
        };
        bail!("{} is {what}; expected a file", path.display());
    }
    Ok(())
}

/// Runs `f`, turning a panic inside it (in a dependency, on input it did not expect) into
/// `Err(message)`. The panic hook is wrapped once for the process, and a thread-local flag keeps
/// a panic caught here quiet: a panic on another thread meanwhile still reaches the previous hook.
pub fn without_panics<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::thread_local! {
        static QUIET: Cell<bool> = const { Cell::new(false) };
    }
    static WRAP_HOOK: std::sync::Once = std::sync::Once::new();
    WRAP_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let was_quiet = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was_quiet));
    result.map_err(|payload| {
        if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "a panic without a message".to_owned()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lines_end_at_the_limit_and_drop_their_newline() {
        let mut r = std::io::Cursor::new(b"abc\r\nabcd\nabcde\nlast".to_vec());
        let mut next = || match read_line_bounded(&mut r, 4).unwrap() {
            Some(BoundedLine::Line(b)) => Some(String::from_utf8(b).unwrap()),
            Some(BoundedLine::TooLong) => Some("too long".into()),
            None => None,
        };
        assert_eq!(next().as_deref(), Some("abc"));
        assert_eq!(next().as_deref(), Some("abcd"));
        assert_eq!(next().as_deref(), Some("too long"));
    }

    #[test]
    fn error_lines_are_one_short_printable_line() {
        let inner = anyhow::anyhow!("tensor '{}\x1b[2J' is bad\nbacktrace", "x".repeat(5000));
        let e = inner.context("model.gguf: not a valid GGUF file");
        let line = one_line_error(&e);
        assert!(
            line.starts_with("model.gguf: not a valid GGUF file: tensor 'xxx"),
            "{line}"
        );
        assert!(!line.contains('\n') && !line.contains('\x1b'));
        assert!(
            line.chars().count() <= 2 * MAX_ERROR_PART_CHARS + 3,
            "{}",
            line.len()
        );
        assert!(line.ends_with('…'));
        let e = anyhow::anyhow!("bell \x07 here");
        assert_eq!(one_line_error(&e), "bell \\u{7} here");
        let escaped = one_line_error(&anyhow::anyhow!("{}", "\x15".repeat(400)));
        assert_eq!(
            escaped.chars().count(),
            MAX_ERROR_PART_CHARS + 1,
            "{escaped}"
        );
    }
}
