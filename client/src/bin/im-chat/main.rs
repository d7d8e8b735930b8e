//! im-chat: a command-line chat for people and scripts, built on the
//! im-client SDK.
//!
//! - `main.rs` (this file): the command-line grammar and dispatch.
//! - `commands.rs`: what each command does against the server.
//! - `format.rs`: recipient parsing and output lines (no I/O).
//! - `state.rs`: the session and cursors saved under `--dir`.
#![forbid(unsafe_code)]
// Doc comments in this file are clap help texts written for the terminal,
// not rustdoc.
#![allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]

mod commands;
mod format;
mod state;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Chat on an im server from the terminal.
///
/// Recipients are usernames (`bob`) or group ids (`#12`). Log in once with
/// `im-chat login <username>`; the session is saved under --dir and resumed
/// by every other command.
#[derive(Debug, Parser)]
#[command(name = "im-chat", version)]
pub struct Cli {
    /// Server address, host:port, or several nodes of one cluster separated
    /// by commas (A,B,C: one is used, the next after a failure) [default:
    /// the saved session's server, else 127.0.0.1:7000].
    #[arg(long, env = "IM_SERVER", global = true)]
    pub server: Option<String>,
    /// Directory for the saved session and cursors [default: <user config
    /// dir>/im-chat].
    #[arg(long, env = "IM_CHAT_DIR", global = true)]
    pub dir: Option<PathBuf>,
    /// Print one JSON object per line instead of text for people.
    #[arg(long, global = true)]
    pub json: bool,
    /// Connect over TLS, trusting the system's root certificates (the
    /// server's --tls-listen address) [default: what login saved].
    #[arg(long, env = "IM_TLS", global = true)]
    pub tls: bool,
    /// Connect over TLS, trusting the CA certificates in this PEM file only
    /// (a private CA); implies --tls.
    #[arg(long, env = "IM_CA_FILE", global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an account and log in.
    Register(Auth),
    /// Log in and save the session.
    Login(Auth),
    /// End this device's session on the server (with --all: every
    /// session of the account, on every device) and forget it here.
    Logout {
        /// End every session of the account, not only this one.
        #[arg(long)]
        all: bool,
    },
    /// Change the password; every other session of the account ends.
    Password {
        /// The current password; prompted for when not given.
        #[arg(long, env = "IM_PASSWORD", hide_env_values = true)]
        old: Option<String>,
        /// The new password (8 to 128 bytes); prompted for when not given.
        #[arg(long, env = "IM_NEW_PASSWORD", hide_env_values = true)]
        new: Option<String>,
    },
    /// List the account's sessions (devices), or end one.
    Sessions {
        #[command(subcommand)]
        action: Option<SessionsCommand>,
    },
    /// Show the saved session.
    Whoami,
    /// Send a message (text, or an image or file reference).
    Send(SendArgs),
    /// List conversations with unread counts and the last message.
    Conversations,
    /// Show earlier messages of a conversation.
    History {
        /// Username or #group_id.
        to: String,
        /// How many messages.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Only messages before this seq (0: the newest).
        #[arg(long, default_value_t = 0)]
        before: u64,
    },
    /// Print incoming messages and receipts as they arrive, after catching
    /// up on what arrived since the last run.
    Listen {
        /// Exit after this many messages (with status 1 if --timeout comes
        /// first).
        #[arg(long)]
        count: Option<u64>,
        /// Exit after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Chat interactively: type lines to send them to <to>; incoming
    /// messages of all conversations are shown as they arrive.
    /// Commands: /to <target>, /history [n], /quit.
    Chat {
        /// Username or #group_id.
        to: String,
    },
    /// Manage groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Show whether users are online.
    Presence {
        /// Usernames.
        #[arg(required = true)]
        users: Vec<String>,
        /// Keep printing changes until interrupted.
        #[arg(long)]
        watch: bool,
    },
    /// Look users up by username.
    Users {
        /// Usernames.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// End a session by its id (as listed by `im-chat sessions`).
    End {
        /// The session id.
        id: u64,
    },
}

#[derive(Debug, Args)]
pub struct Auth {
    /// 3 to 32 characters of [A-Za-z0-9_.-].
    pub username: String,
    /// Name of this device in the account's session list (at most 64
    /// bytes).
    #[arg(long, env = "IM_DEVICE_NAME", default_value = "im-chat")]
    pub device_name: String,
    /// The password; prompted for (without echo) when not given.
    #[arg(long, env = "IM_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Username or #group_id.
    pub to: String,
    /// The text (words are joined with spaces).
    #[arg(trailing_var_arg = true)]
    pub text: Vec<String>,
    /// Send an image stored at this URL instead of text.
    #[arg(long, value_name = "URL", conflicts_with = "file")]
    pub image: Option<String>,
    /// Send a file stored at this URL instead of text.
    #[arg(long, value_name = "URL")]
    pub file: Option<String>,
    /// File name shown to the recipients (with --file).
    #[arg(long, requires = "file")]
    pub name: Option<String>,
    /// MIME type of the image or file.
    #[arg(long)]
    pub mime: Option<String>,
    /// Size of the image or file in bytes.
    #[arg(long)]
    pub size: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a group with initial members.
    Create {
        name: String,
        /// Usernames of the initial members besides you.
        members: Vec<String>,
    },
    /// Add members to a group.
    Add {
        group_id: u64,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove members from a group (owner only).
    Remove {
        group_id: u64,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Leave a group.
    Leave { group_id: u64 },
    /// List the members of a group.
    Members { group_id: u64 },
    /// List your groups.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", commands::describe(&e));
            ExitCode::FAILURE
        }
    }
}
