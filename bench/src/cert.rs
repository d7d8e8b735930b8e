//! `im-cert`: writes a private CA and a server certificate it signed (PEM)
//! for trying TLS out and for the benchmarks: `ca.pem`, `cert.pem` and
//! `key.pem` in the given directory. Not for production, where the
//! certificate comes from the operator's CA.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Write a throwaway CA and a server certificate (PEM) for TLS tests")]
struct Args {
    /// Directory to write ca.pem, cert.pem and key.pem into.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Names and IP addresses the server certificate is valid for.
    #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
    names: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut ca_params = rcgen::CertificateParams::new(Vec::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "im throwaway CA");
    let ca_key = rcgen::KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(args.names.clone())?.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(&args.dir).with_context(|| args.dir.display().to_string())?;
    let write = |name: &str, text: String| {
        let path = args.dir.join(name);
        std::fs::write(&path, text).with_context(|| path.display().to_string())
    };
    write("ca.pem", ca.pem())?;
    write("cert.pem", cert.pem())?;
    write("key.pem", key.serialize_pem())?;
    println!(
        "wrote ca.pem, cert.pem, key.pem to {} for {}",
        args.dir.display(),
        args.names.join(", ")
    );
    Ok(())
}
