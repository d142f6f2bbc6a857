//! Containment of third-party parsers that can panic on malformed input (the `tokenizers` crate
//! panics inside some decoders, BPE models, post-processor templates and normalizer lists).
//!
//! Natively, `contained` catches the unwind and turns it into one `Error::Input` naming the file;
//! the panic hook `install_quiet_panic_hook` keeps such a caught panic from printing a second,
//! misleading line. In WebAssembly a panic aborts the module (the page's build uses
//! `panic = "abort"`), so nothing can be caught there: `contained` records which file is being
//! parsed, the wasm panic hook reads it (`current_file`), and the page names that file when the
//! worker traps. The structures known to panic are also checked before they reach the crate
//! (`formats::tokenizer`), so the trap is a last resort.

use crate::error::{bad_input, Result};
use std::cell::RefCell;

thread_local! {
    /// The files whose parsing is in progress on this thread, innermost last.
    static PARSING: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// The file being parsed by a `contained` call on this thread, if any.
pub fn current_file() -> Option<String> {
    PARSING.with(|p| p.borrow().last().cloned())
}

/// Run `f`, which parses `file` with a third-party crate; a panic inside becomes
/// `file: <what> failed on this file (<panic message>)`.
pub fn contained<T>(file: &str, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    PARSING.with(|p| p.borrow_mut().push(file.to_string()));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    PARSING.with(|p| p.borrow_mut().pop());
    r.unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(bad_input(file, format!("{what} failed on this file, which is malformed ({})", msg.trim())))
    })
}

/// Install a panic hook that stays silent for panics `contained` will catch and report (their
/// message becomes part of the one error line), and prints every other panic as before.
pub fn install_quiet_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if current_file().is_none() {
            previous(info);
        }
    }));
}
