//! The storage worker: consumes the message streams into MySQL.
