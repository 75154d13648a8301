//! Helpers shared by podnet's kernel programs.
#![no_std]

pub mod read;
