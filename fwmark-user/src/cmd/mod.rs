//! One file per subcommand: each turns its clap arguments into a call of
//! the library, prints, and is the edge where errors become messages. No
//! command imports another.

pub mod apply;
pub mod check;
pub mod detach;
pub mod explain;
pub mod export;
pub mod import;
pub mod run;
pub mod status;
