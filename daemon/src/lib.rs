//! cryptnbd daemon library (in progress).
