//! One file per subcommand: each reads its arguments, calls the library
//! and prints. No command imports another.

pub mod apply;
pub mod check;
pub mod detach;
pub mod explain;
pub mod export;
pub mod import;
