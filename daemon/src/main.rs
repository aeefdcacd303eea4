//! cryptnbd (in progress).
fn main() {}
