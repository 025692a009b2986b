//! One module per subcommand: each turns its clap arguments into a call of
//! the library and is the edge where errors become messages.

pub mod run;
pub mod status;
