//! In-process protocol emulators of the cloud providers. Each speaks the
//! provider's real wire protocol on 127.0.0.1 and runs commands as real local
//! processes, so providers are tested end to end without an account.

pub mod e2b;
