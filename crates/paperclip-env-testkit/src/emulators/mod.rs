//! In-process protocol emulators of the cloud providers. Each speaks the
//! provider's real wire protocol on 127.0.0.1 and runs commands as real local
//! processes, so providers are tested end to end without an account.

// Handlers return `Result<Response, Response>`: both arms are HTTP answers.
#[allow(clippy::result_large_err)]
pub mod cloudflare_bridge;
#[allow(clippy::result_large_err)]
pub mod daytona;
pub mod e2b;
pub mod exe_dev;
