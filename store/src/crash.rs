//! Crash injection for the crash-consistency tests: [`crash_point`] marks the places where a
//! test build may be killed (the `crash-points` feature), so the tests can prove that every
//! multi-step change leaves either the old or the new state; the same places can be slowed
//! down, so that a test catches a long operation while it runs. A leaf: it imports nothing.

#[cfg(feature = "crash-points")]
use std::sync::Mutex;

/// Test builds' crash injection: when the `crash-points` feature is on and the environment
/// variable `CRYPTNBD_CRASH_AT` names this point, the process kills itself with SIGKILL here
/// (as `kill -9` would, no cleanup). `CRYPTNBD_CRASH_AT=name:N` crashes at the Nth time the
/// point is reached. `CRYPTNBD_SLOW_AT=name:MS` sleeps MS milliseconds each time the point is
/// reached instead (a test that must cancel an operation while it runs, on a machine fast
/// enough to finish it first). Without the feature this does nothing.
pub fn crash_point(name: &str) {
    #[cfg(feature = "crash-points")]
    {
        if let Ok(slow) = std::env::var("CRYPTNBD_SLOW_AT")
            && let Some((point, ms)) = slow.split_once(':')
            && point == name
        {
            std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap_or(0)));
        }
        static HITS: std::sync::OnceLock<Mutex<std::collections::HashMap<String, u64>>> =
            std::sync::OnceLock::new();
        let Ok(want) = std::env::var("CRYPTNBD_CRASH_AT") else {
            return;
        };
        let (point, nth) = match want.split_once(':') {
            Some((p, n)) => (p, n.parse::<u64>().unwrap_or(1)),
            None => (want.as_str(), 1),
        };
        if point != name {
            return;
        }
        let mut hits = HITS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = hits.entry(name.to_owned()).or_insert(0);
        *n += 1;
        if *n == nth {
            eprintln!("crash point {name} reached: killing myself");
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
        }
    }
    #[cfg(not(feature = "crash-points"))]
    let _ = name;
}
