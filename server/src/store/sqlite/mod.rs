//! Embedded, durable single-node store on SQLite.
