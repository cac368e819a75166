//! Bounded waits: a test never hangs on something that does not happen.

use std::path::Path;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(20);

/// Polls `done` until it holds or `timeout` has passed; whether it held.
pub fn until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until `path` exists (a workload's `touch`, a listener's ready file); whether it does.
pub fn for_file(path: &Path, timeout: Duration) -> bool {
    until(timeout, || path.exists())
}
