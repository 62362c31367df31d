//! One module per subcommand family.

pub mod data;
pub mod train;
