//! Placeholder until the XTS benchmark lands.
fn main() {}
