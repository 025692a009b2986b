//! Empty library target: it lets `fwmark-user` declare a build-dependency on
//! this crate, so cargo rebuilds the loader when the classifier changes.
#![no_std]
