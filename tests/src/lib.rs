//! Test harness for podnet integration tests.
