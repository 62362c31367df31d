//! One module per subcommand family.

pub mod data;
pub mod doctor;
pub mod embed;
pub mod launch;
pub mod parity;
pub mod train;
