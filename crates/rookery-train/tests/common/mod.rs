//! Helpers shared by the integration tests.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Copies the files of directory `from` into `to` (created).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Tests that train take turns: run side by side in one process, a 2-rank resume was seen to
/// differ from the uninterrupted run in about 1 of 5 runs (never when run one at a time); the
/// cause is not found yet (rookery issue notes).
pub fn serial() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}
