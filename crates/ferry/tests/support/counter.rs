//! A workload whose output shows loss and duplication at a glance: a counter printing every
//! 10 ms, one number per line from 0.
#![allow(dead_code)] // each user takes what it needs

use std::io::BufRead;
use std::process::{Command, Stdio};

/// The shell script of the counter (for `sh -c`).
pub const SCRIPT: &str = "i=0; while true; do echo $i; i=$((i+1)); sleep 0.01; done";

/// The lines of a counter's output, checked: consecutive from 0, each once.
pub fn lines(text: &str) -> usize {
    for (i, line) in text.lines().enumerate() {
        assert_eq!(line, i.to_string(), "line {i} of the counter: {text:?}");
    }
    text.lines().count()
}

/// Runs `follow` (a command printing the counter's output from the start and going on, such
/// as `ferry logs -f`) and checks its lines until there are more than `past`; returns how
/// many it read.
pub fn follow(mut follow: Command, past: usize) -> usize {
    let mut child = follow
        .stdout(Stdio::piped())
        .spawn()
        .expect("follow the counter");
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut n = 0;
    for line in out.lines() {
        assert_eq!(line.unwrap(), n.to_string(), "line {n} of the counter");
        n += 1;
        if n > past {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    n
}
