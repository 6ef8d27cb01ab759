//! Helpers shared by the binary's end-to-end tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The `meridian` binary under test.
pub fn meridian() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
}

/// Kills the child if a test fails before stopping it.
pub struct Guard(pub Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `meridian dev --nodes N` on `dir` and waits for its "is running" line; its
/// later output goes to the test's stderr, prefixed `dev:`.
pub fn start_dev(dir: &Path, nodes: usize) -> Guard {
    let mut child = meridian()
        .args(["dev", "--nodes", &nodes.to_string(), "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn meridian dev");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines.next().expect("dev printed its banner").expect("line");
        if line.contains("is running") {
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("dev: {line}");
        }
    });
    Guard(Some(child))
}
