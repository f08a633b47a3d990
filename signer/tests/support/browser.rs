//! A headless Chromium for the dashboard tests: loads a page, lets its
//! scripts run (virtual time, so timers and fetches finish without real
//! waiting), and returns the DOM as the browser rendered it.
//!
//! `scripts/chromium` installs Debian's `chromium` when missing (the test
//! command calls it). Without a browser the tests fail, naming what to do,
//! unless `MESHWARD_SKIP_BROWSER_TESTS=1`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

const CANDIDATES: &[&str] = &["chromium", "chromium-browser", "google-chrome", "chrome"];

/// The browser binary, or `None` when the tests were told to skip.
pub fn chromium() -> Option<PathBuf> {
    if std::env::var("MESHWARD_SKIP_BROWSER_TESTS").as_deref() == Ok("1") {
        eprintln!("MESHWARD_SKIP_BROWSER_TESTS=1: browser test skipped");
        return None;
    }
    if let Ok(path) = std::env::var("MESHWARD_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in CANDIDATES {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    panic!(
        "no Chromium found (tried {CANDIDATES:?} on PATH and $MESHWARD_CHROMIUM): \
         run scripts/chromium, or set MESHWARD_SKIP_BROWSER_TESTS=1"
    );
}

/// Load `url` in a fresh headless profile, give its scripts `budget` of
/// virtual time, and return the rendered DOM.
pub async fn dump_dom(browser: &std::path::Path, url: &str, budget: Duration) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(browser);
    command
        .arg("--headless")
        // Root in CI containers: Chromium's sandbox needs user namespaces.
        .arg("--no-sandbox")
        .arg("--disable-gpu")
        .arg("--disable-dev-shm-usage")
        .arg("--no-first-run")
        .arg("--disable-extensions")
        .arg("--disable-background-networking")
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().unwrap();
    let output = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("chromium did not finish within 90 s")
        .unwrap();
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && dom.contains("<html"),
        "chromium failed ({}): {}\nstdout: {dom}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    dom
}

/// The text inside the element with `id` in a dumped DOM (the first tag
/// carrying it; nested markup included verbatim).
pub fn element_text<'a>(dom: &'a str, id: &str) -> &'a str {
    let marker = format!("id=\"{id}\"");
    let at = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no element with id {id} in:\n{dom}"));
    let open_end = at + dom[at..].find('>').unwrap() + 1;
    let close = open_end + dom[open_end..].find("</").unwrap();
    &dom[open_end..close]
}
