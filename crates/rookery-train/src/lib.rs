//! rookery-train: the run configuration ([`config`]), the training loop ([`trainer`]), the
//! optimizer pieces ([`optim`]), fresh parameter leaves for accumulation ([`leaves`]),
//! checkpoints ([`checkpoint`]), metrics ([`metrics`]) and plots
//! ([`plot`]).

pub mod adam;
pub mod adam_kernel;
pub mod causal;
pub mod checkpoint;
pub mod config;
pub mod flamingo_io;
pub mod leaves;
pub mod lm_io;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod parallel;
pub mod parity;
pub mod plot;
pub mod stage;
pub mod step;
pub mod trainer;

pub use config::RunConfig;
pub use trainer::{train, train_on, TrainSummary};
