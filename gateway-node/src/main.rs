//! `gateway-node`: parses the configuration, sets up logging, binds, and
//! runs the node until ctrl-c or SIGTERM.

use anyhow::Context;
use clap::Parser;
use gateway_node::config::{Cli, Command, Config, LogFormat, TokenArgs, DEV_SECRET};
use gateway_shared::token;
use std::process::ExitCode;
use tracing::{info, warn};

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Token(args)) => print_token(&args),
        Some(Command::Serve(config)) => serve(config),
        None => serve(cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway-node: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print_token(args: &TokenArgs) -> anyhow::Result<()> {
    gateway_node::config::check_secret(&args.jwt_secret, true)?;
    let id_len = args.sub.chars().count();
    let name_len = args.name.chars().count();
    anyhow::ensure!((1..=64).contains(&id_len), "--sub must be 1-64 characters");
    anyhow::ensure!(
        (1..=32).contains(&name_len),
        "--name must be 1-32 characters"
    );
    let claims = token::claims(&args.sub, &args.name, args.admin, args.ttl_s)
        .with_iss_aud(args.jwt_issuer.as_deref(), args.jwt_audience.as_deref());
    println!("{}", token::mint(args.jwt_secret.as_bytes(), &claims));
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

fn serve(mut config: Config) -> anyhow::Result<()> {
    config.validate()?;
    init_logging(config.log_format);
    let secret = match (config.secret()?, config.dev) {
        (Some(secret), _) => secret,
        (None, true) => DEV_SECRET.to_owned(),
        (None, false) if config.redis_url.is_none() => {
            // A lone node with no secret: make one for this run so that a
            // newcomer can connect at once with the token logged below.
            let secret: String = (0..48)
                .map(|_| {
                    char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rand::random_range(0..36)])
                })
                .collect();
            warn!("no --jwt-secret given: using a random secret for this run only");
            secret
        }
        (None, false) => anyhow::bail!(
            "a JWT secret is required with --redis-url (--jwt-secret or GATEWAY_JWT_SECRET)"
        ),
    };
    let generated = config.jwt_secret.is_none() && config.jwt_secret_file.is_none();
    // No secret configured: development mode, so that the demo page can get
    // tokens for the names people type.
    config.dev |= generated;
    let listen = config.listen;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = config.worker_threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let node = gateway_node::build(config, &secret).await?;
        if generated {
            let admin = token::mint(
                secret.as_bytes(),
                &token::claims("admin", "admin", true, 24 * 3600),
            );
            info!(token = %admin, "development admin token (valid 24 h)");
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let addr = listener.local_addr()?;
        info!(%addr, node = %node.node_id, "listening");
        if node.config.demo {
            info!("demo chat page at http://{addr}/");
        }
        gateway_node::run(listener, node, shutdown_signal()).await;
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("shutdown signal received");
}
