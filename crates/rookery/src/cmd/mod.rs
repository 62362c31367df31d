//! One module per subcommand family.

pub mod bench;
pub mod data;
pub mod doctor;
pub mod embed;
pub mod eval;
pub mod launch;
pub mod parity;
pub mod train;
